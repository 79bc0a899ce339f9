//! Routes and handlers of the native API (`/v1/…`), health and metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, delete, get, post, put};
use axum::{Json, Router};
use ferry_core::model::{FunctionRecord, PackageRecord, VersionRecord};
use ferry_core::proto::Outcome;
use ferry_core::{Error, ErrorCode, keys};
use ferry_store::{Compare, Op, Txn};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::catalog::Qualifier;
use crate::error::{ApiError, ApiResult};
use crate::idempotency::Begin;
use crate::tenancy::{self, Principal};

type St = State<Arc<AppState>>;
type Who = axum::Extension<Principal>;

/// The request id: taken from `X-Request-Id` when sane, otherwise minted.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

type Routes = Vec<(&'static str, MethodRouter<Arc<AppState>>)>;

/// The native API: every route behind the token. `/openapi.json` documents each of them
/// (a test checks both ways).
fn native_routes() -> Routes {
    vec![
        ("/v1/functions", get(list_functions).post(create_function)),
        ("/v1/functions/{name}", get(get_function)),
        (
            "/v1/functions/{name}/versions",
            get(list_versions).post(upload_version),
        ),
        ("/v1/functions/{name}/versions/{version}", get(get_version)),
        ("/v1/functions/{name}/invoke", post(invoke)),
        ("/v1/functions/{name}/aliases", get(crate::aliases::list)),
        (
            "/v1/functions/{name}/aliases/{alias}",
            get(crate::aliases::get)
                .put(crate::aliases::set)
                .delete(crate::aliases::delete),
        ),
        ("/v1/functions/{name}/tasks", post(crate::tasks::submit)),
        ("/v1/tasks", get(crate::task_list::list)),
        ("/v1/tasks/{id}", get(crate::tasks::get)),
        ("/v1/tasks/{id}/cancel", post(crate::tasks::cancel)),
        ("/v1/queues", get(crate::queues::list)),
        (
            "/v1/queues/{name}",
            get(crate::queues::get)
                .put(crate::queues::set)
                .delete(crate::queues::delete),
        ),
        ("/v1/reruns", post(crate::reruns::create)),
        ("/v1/reruns/{id}", get(crate::reruns::get)),
        ("/v1/packages/{sha256}", get(get_package)),
        (
            "/v1/nodes",
            get(crate::nodes::list).route_layer(middleware::from_fn(admin_only)),
        ),
        (
            "/v1/nodes/{id}/{action}",
            post(crate::nodes::admin).route_layer(middleware::from_fn(admin_only)),
        ),
        ("/v1/clusters", get(list_clusters)),
        ("/v1/callback-secret", get(tenancy::callback_secret)),
        ("/v1/tenants", get(tenancy::list).post(tenancy::create)),
        (
            "/v1/tenants/{id}",
            get(tenancy::get).delete(tenancy::delete),
        ),
        ("/v1/tenants/{id}/limits", put(tenancy::set_limits)),
        (
            "/v1/tenants/{id}/keys",
            get(tenancy::list_keys).post(tenancy::create_key),
        ),
        (
            "/v1/tenants/{id}/keys/{key_id}",
            delete(tenancy::revoke_key),
        ),
    ]
}

/// Routes without a token: health, metrics and the API's description.
fn open_routes() -> Routes {
    vec![
        ("/healthz", get(|| async { "ok" })),
        ("/readyz", get(readyz)),
        ("/metrics", get(metrics)),
        (
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        ),
    ]
}

/// The compatibility APIs (AWS Lambda, OpenFaaS): they authenticate in their own way.
fn compat_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/2015-03-31/functions/{name}/invocations",
            post(crate::lambda::invoke),
        )
        .route("/function/{name}", any(crate::openfaas::sync))
        .route("/function/{name}/{*path}", any(crate::openfaas::sync))
        .route("/async-function/{name}", post(crate::openfaas::submit))
        .route(
            "/async-function/{name}/{*path}",
            post(crate::openfaas::submit),
        )
}

/// Every path the gateway's router serves (native and open), as registered.
pub fn served_paths() -> Vec<&'static str> {
    native_routes()
        .into_iter()
        .chain(open_routes())
        .map(|(p, _)| p)
        .collect()
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let v1 = native_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, m)| r.route(path, m))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    open_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, m)| r.route(path, m))
        .merge(v1)
        .merge(compat_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

/// Request ids, metrics, and the one place errors are logged and given their id.
async fn observe(State(st): St, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(ferry_core::id::new_id);
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
    let method = req.method().clone();
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Some(err) = resp.extensions_mut().remove::<Error>() {
        if err.code.http_status() >= 500 {
            tracing::warn!(request_id = %id, %method, %route, code = %err.code, message = %err.message, "request failed");
        } else {
            tracing::debug!(request_id = %id, %method, %route, code = %err.code, message = %err.message, "request refused");
        }
        // The body gains the request id; the headers (Retry-After, X-Ferry-Version…) stay.
        let (mut parts, _) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = serde_json::to_vec(&err.to_json(&id)).unwrap_or_default();
        resp = Response::from_parts(parts, Body::from(body));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    st.metrics
        .requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    st.metrics
        .latency
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Every `/v1` route needs `Authorization: Bearer <token>`: the admin token, or a
/// tenant's API key. Which one it was travels on as the request's [`Principal`].
async fn auth(State(st): St, mut req: Request, next: Next) -> Response {
    let Some(principal) = bearer(&st, req.headers()) else {
        return ApiError::new(ErrorCode::Unauthorized, "missing or invalid bearer token")
            .into_response();
    };
    // An invocation or a submission is held to the tenant's rate here, first thing.
    let invocation = req.extensions().get::<MatchedPath>().is_some_and(|p| {
        matches!(
            p.as_str(),
            "/v1/functions/{name}/invoke" | "/v1/functions/{name}/tasks"
        )
    });
    if invocation && let Err(t) = st.limiter.admit_tenant(&principal) {
        return throttled(&st, t);
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Who `Authorization: Bearer …` names: the admin token or a live tenant key.
pub(crate) fn bearer(st: &AppState, headers: &HeaderMap) -> Option<Principal> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or("");
    if ferry_core::id::constant_time_eq(presented.as_bytes(), st.cfg.token.as_bytes()) {
        Some(Principal::Admin)
    } else {
        st.directory.by_key(presented).map(Principal::Tenant)
    }
}

/// For handlers that do not take the [`Principal`]: refuses tenant keys.
async fn admin_only(req: Request, next: Next) -> Response {
    match req.extensions().get::<Principal>() {
        Some(Principal::Admin) => next.run(req).await,
        _ => {
            ApiError::new(ErrorCode::Forbidden, "this route needs the admin token").into_response()
        }
    }
}

async fn readyz(State(st): St) -> Response {
    match tokio::time::timeout(
        std::time::Duration::from_secs(1),
        st.store.get(keys::ROUTING),
    )
    .await
    {
        Ok(Ok(_)) => (StatusCode::OK, "ready").into_response(),
        _ => ApiError::new(ErrorCode::Unavailable, "store unreachable").into_response(),
    }
}

async fn metrics(State(st): St) -> Response {
    // Queue depth and running tasks, read now (a scrape every few seconds at most).
    match crate::queues::counts(st.store.as_ref()).await {
        Ok(counts) => {
            let g = &st.metrics.queue_tasks;
            g.reset();
            for (queue, c) in &counts {
                let queue = if queue.is_empty() { "default" } else { queue };
                for p in ferry_core::task::Priority::ALL {
                    let i = p as usize;
                    g.with_label_values(&[queue, p.as_str(), "queued"])
                        .set(c.queued[i] as i64);
                    g.with_label_values(&[queue, p.as_str(), "running"])
                        .set(c.running[i] as i64);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading queue depths for /metrics failed"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

/// How much of an oversized body is read and dropped before answering 413.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads a body up to `limit` bytes; more is `payload_too_large`.
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit as u64) {
        // Read (and drop) a moderately oversized body so the client, still sending, gets
        // the 413 rather than a broken pipe; a huge one just has its connection cut.
        if n <= limit as u64 + DRAIN_LIMIT {
            let mut body = body.into_data_stream();
            while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {}
        }
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let limited = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if limited {
            too_large()
        } else {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("cannot read request body: {e}"),
            )
        }
    })
}

pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        })
}

/// Parses a JSON body, telling malformed JSON (`invalid_json`) from a wrong shape.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() {
            ErrorCode::InvalidJson
        } else {
            ErrorCode::BadRequest
        };
        ApiError::new(code, format!("request body: {e}"))
    })
}

/// A name a caller may create: a plain function name; the admin may also name a
/// tenant's function as `{tenant}.{name}`. Returns the internal name.
fn check_name(who: &Principal, name: &str) -> ApiResult<String> {
    let valid = ferry_core::id::valid_name(name)
        || (who.is_admin()
            && name.split_once('.').is_some_and(|(t, n)| {
                ferry_core::id::valid_name(t) && ferry_core::id::valid_name(n)
            }));
    if valid {
        Ok(who.internal(name))
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidName,
            format!(
                "{name:?} is not a valid function name (1-63 lowercase letters, digits or '-', starting with a letter)"
            ),
        ))
    }
}

fn function_json(who: &Principal, f: &FunctionRecord) -> serde_json::Value {
    json!({
        "name": who.external(&f.name),
        "description": f.description,
        "latest_version": f.latest_version,
        "created_ms": f.created_ms,
        "updated_ms": f.updated_ms,
    })
}

/// A version as its caller sees it (under the name the caller knows).
pub(crate) fn version_json(who: &Principal, v: &VersionRecord) -> serde_json::Value {
    let mut j = serde_json::to_value(v).unwrap_or_default();
    j["name"] = json!(who.external(&v.name));
    j
}

async fn list_functions(State(st): St, who: Who) -> Json<serde_json::Value> {
    let list: Vec<_> = st
        .catalog
        .list()
        .iter()
        .filter(|f| who.owns(&f.name))
        .map(|f| function_json(&who, f))
        .collect();
    Json(json!({ "functions": list }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

async fn create_function(
    State(st): St,
    who: Who,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let bytes = read_body(&headers, body, 64 << 10).await?;
    let req: CreateFunction = parse_json(&bytes)?;
    let internal = check_name(&who, &req.name)?;
    let now = ferry_core::now_ms();
    let rec = FunctionRecord {
        name: internal.clone(),
        description: req.description,
        created_ms: now,
        updated_ms: now,
        latest_version: 0,
    };
    let key = keys::function(&internal);
    let r = st
        .store
        .txn(
            Txn::new()
                .when(Compare::absent(&key))
                .then(Op::put(&key, serde_json::to_vec(&rec).unwrap_or_default())),
        )
        .await?;
    if !r.succeeded {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("function {:?} already exists", req.name),
        ));
    }
    st.catalog.wait_for(r.revision, false).await;
    Ok((StatusCode::CREATED, Json(function_json(&who, &rec))).into_response())
}

async fn get_function(
    State(st): St,
    who: Who,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let name = who.internal(&name);
    let f = st.catalog.function(&name).await?;
    let mut v = function_json(&who, &f);
    v["versions"] = st
        .catalog
        .versions_of(&name)
        .iter()
        .map(|r| version_json(&who, r))
        .collect();
    Ok(Json(v))
}

async fn list_versions(
    State(st): St,
    who: Who,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let name = who.internal(&name);
    st.catalog.function(&name).await?;
    let list: Vec<serde_json::Value> = st
        .catalog
        .versions_of(&name)
        .iter()
        .map(|r| version_json(&who, r))
        .collect();
    Ok(Json(json!({ "versions": list })))
}

async fn get_version(
    State(st): St,
    who: Who,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let v: u32 = version.parse().map_err(|_| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("version {version:?} is not a number"),
        )
    })?;
    let rec = st.catalog.version(&who.internal(&name), Some(v)).await?;
    Ok(Json(version_json(&who, &rec)))
}

/// Uploads a package as the function's next version. Everything is checked before
/// anything is written: a refused package leaves no trace.
async fn upload_version(
    State(st): St,
    who: Who,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let shown_name = name;
    let name = check_name(&who, &shown_name)?;
    let bytes = read_body(&headers, body, st.cfg.max_package).await?;
    let max_unpacked = st.cfg.max_unpacked;
    let b = bytes.clone();
    let inspected = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let i = ferry_core::package::inspect(&b, max_unpacked)?;
        if i.manifest.kind == ferry_core::package::Kind::Wasm {
            validate_component(&i.entry)?;
        }
        Ok((i.manifest, ferry_core::id::sha256_hex(&b)))
    })
    .await
    .map_err(|e| Error::internal(format!("package check: {e}")))?;
    let (manifest, sha) = inspected?;
    if manifest.name != tenancy::shown(&name) {
        return Err(ApiError::new(
            ErrorCode::InvalidManifest,
            format!(
                "ferry.toml names function {:?}, but the upload is for {shown_name:?}",
                manifest.name
            ),
        ));
    }
    st.blobs.put(&sha, &bytes).await?;

    // Commit version N+1 with a compare-and-swap on the function record; retry on races.
    let fkey = keys::function(&name);
    for _ in 0..16 {
        let current = st.store.get(&fkey).await?;
        let now = ferry_core::now_ms();
        let (mut func, expected) = match &current {
            Some(kv) => (
                serde_json::from_slice::<FunctionRecord>(&kv.value)
                    .map_err(|e| Error::internal(format!("function record: {e}")))?,
                kv.mod_revision,
            ),
            None => (
                FunctionRecord {
                    name: name.clone(),
                    description: manifest.description.clone(),
                    created_ms: now,
                    updated_ms: now,
                    latest_version: 0,
                },
                0,
            ),
        };
        if func.latest_version > 0 {
            let latest = st.catalog.version(&name, Some(func.latest_version)).await?;
            if latest.sha256 == sha {
                // Same bytes as the latest version: nothing new to publish.
                let mut body = version_json(&who, &latest);
                body["unchanged"] = json!(true);
                return Ok((StatusCode::OK, Json(body)).into_response());
            }
        }
        func.latest_version += 1;
        func.updated_ms = now;
        if manifest.description.is_some() {
            func.description = manifest.description.clone();
        }
        let version = VersionRecord {
            name: name.clone(),
            version: func.latest_version,
            sha256: sha.clone(),
            size: bytes.len() as u64,
            kind: manifest.kind,
            limits: manifest.limits,
            resources: manifest.resources.clone(),
            retry: manifest.retry,
            created_ms: now,
        };
        let package = PackageRecord {
            sha256: sha.clone(),
            size: bytes.len() as u64,
            kind: manifest.kind,
            created_ms: now,
        };
        let txn = Txn::new()
            .when(Compare::mod_revision(&fkey, expected))
            .then(Op::put(
                &fkey,
                serde_json::to_vec(&func).unwrap_or_default(),
            ))
            .then(Op::put(
                keys::version(&name, version.version),
                serde_json::to_vec(&version).unwrap_or_default(),
            ))
            .then(Op::put(
                keys::package(&sha),
                serde_json::to_vec(&package).unwrap_or_default(),
            ));
        let r = st.store.txn(txn).await?;
        if r.succeeded {
            st.catalog.wait_for(r.revision, true).await;
            tracing::info!(function = %name, version = version.version, sha256 = %sha, "version published");
            return Ok((StatusCode::CREATED, Json(version_json(&who, &version))).into_response());
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        format!("too many concurrent uploads to {name:?}; try again"),
    ))
}

/// A wasm entry must be a valid WebAssembly *component* (not a core module).
fn validate_component(bytes: &[u8]) -> Result<(), Error> {
    let invalid = |m: String| Error::new(ErrorCode::InvalidWasm, m);
    if !wasmparser::Parser::is_component(bytes) {
        return Err(invalid(if wasmparser::Parser::is_core_wasm(bytes) {
            "the module is a core WebAssembly module; Ferry runs components (build for wasm32-wasip2)".into()
        } else {
            "the module is not WebAssembly".into()
        }));
    }
    let mut validator = wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all());
    validator
        .validate_all(bytes)
        .map(|_| ())
        .map_err(|e| invalid(format!("invalid WebAssembly component: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeQuery {
    version: Option<u32>,
}

/// `name`, `name:VERSION` or `name:ALIAS`.
pub(crate) fn split_qualifier(name: &str) -> (&str, Qualifier) {
    match name.split_once(':') {
        None => (name, Qualifier::Latest),
        Some((n, q)) => (n, Qualifier::parse(Some(q))),
    }
}

async fn invoke(
    State(st): St,
    who: Who,
    axum::Extension(rid): axum::Extension<RequestId>,
    Path(name): Path<String>,
    query: Result<Query<InvokeQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let (shown_name, qualified) = split_qualifier(&name);
    let qualified = q.version.map_or(qualified, Qualifier::Version);
    let log_tail = headers.get("x-ferry-log").is_some_and(|v| v == "tail");
    invoke_sync(
        &st,
        &who,
        &rid.0,
        shown_name,
        &qualified,
        &headers,
        body,
        log_tail,
        vec![],
    )
    .await
}

/// A synchronous invocation of `shown_name` (as `who` names it) with `qualified`, from
/// resolution through limits, the body, and idempotency (`Idempotency-Key`) to the
/// answer. Shared by the native route and the compatibility routes, which translate
/// the answer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn invoke_sync(
    st: &AppState,
    who: &Principal,
    request_id: &str,
    shown_name: &str,
    qualified: &Qualifier,
    headers: &HeaderMap,
    body: Body,
    log_tail: bool,
    env: Vec<ferry_core::proto::EnvVar>,
) -> ApiResult<Response> {
    let internal = who.internal(shown_name);
    let fname = internal.as_str();
    let (version, alias) = st.catalog.resolve(fname, qualified).await?;
    if let Err(t) = st.limiter.admit_function(who, fname) {
        return Ok(throttled(st, t));
    }
    let _in_flight = match st.limiter.enter(who, fname) {
        Ok(guard) => guard,
        Err(t) => return Ok(throttled(st, t)),
    };
    let input = read_body(headers, body, who.max_body(st.cfg.max_body)).await?;
    if is_json(headers) {
        parse_json::<serde::de::IgnoredAny>(&input)?;
    }
    let call = Call {
        st,
        fname,
        shown_name,
        version: &version,
        alias: alias.as_deref(),
        request_id,
        log_tail,
        env: &env,
    };
    let Some(key) = crate::idempotency::key_from(headers)? else {
        return Ok(call.run(input).await);
    };
    let ikey = keys::idempotency("invoke", &format!("{fname}/{key}"));
    let sha = ferry_core::id::sha256_hex(&input);
    let run_for = std::time::Duration::from_millis(version.limits.timeout_ms)
        + st.cfg.invoke_grace
        + std::time::Duration::from_secs(5);
    let store = st.store.as_ref();
    match crate::idempotency::begin(store, &ikey, &sha, run_for, st.cfg.idempotency_window).await? {
        Begin::Replay(stored, how) => Ok(stored.into_response(how)),
        Begin::Run {
            revision,
            created_ms,
        } => {
            let resp = call.run(input).await;
            Ok(crate::idempotency::finish(store, &ikey, revision, &sha, created_ms, resp).await)
        }
    }
}

/// One synchronous invocation, resolved and admitted.
struct Call<'a> {
    st: &'a AppState,
    fname: &'a str,
    shown_name: &'a str,
    version: &'a VersionRecord,
    alias: Option<&'a str>,
    request_id: &'a str,
    log_tail: bool,
    env: &'a [ferry_core::proto::EnvVar],
}

impl Call<'_> {
    /// Runs it on some order-server; every outcome is an answer (errors included).
    async fn run(&self, input: Bytes) -> Response {
        let Call {
            st,
            fname,
            shown_name,
            version,
            alias,
            request_id,
            log_tail,
            env,
        } = *self;
        let reply = st
            .router
            .invoke(
                version.spec(),
                input,
                request_id,
                st.cfg.invoke_grace,
                env.to_vec(),
            )
            .await;
        let ver = version.version.to_string();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                st.metrics
                    .invocations
                    .with_label_values(&[fname, &ver, e.code.as_str()])
                    .inc();
                return ApiError::from(e).into_response();
            }
        };
        let outcome = reply.outcome();
        st.metrics
            .invocations
            .with_label_values(&[fname, &ver, outcome.as_str_name()])
            .inc();
        if reply.cold {
            st.metrics.cold_starts.with_label_values(&[fname]).inc();
        }
        let mut resp = match outcome {
            Outcome::Succeeded => {
                let ct = if looks_like_json(&reply.output) {
                    "application/json"
                } else {
                    "application/octet-stream"
                };
                let mut r = Response::new(Body::from(reply.output));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                r
            }
            Outcome::FunctionError => {
                let mut r = ApiError::new(ErrorCode::FunctionError, reply.error).into_response();
                r.headers_mut()
                    .insert("x-ferry-function-error", HeaderValue::from_static("true"));
                r
            }
            Outcome::TimedOut => ApiError::new(ErrorCode::Timeout, reply.error).into_response(),
            Outcome::Cancelled => {
                ApiError::new(ErrorCode::Unavailable, "the invocation was cancelled")
                    .into_response()
            }
            Outcome::Failed | Outcome::Unspecified => {
                let code = ErrorCode::parse(&reply.error_code).unwrap_or(ErrorCode::Internal);
                let code = if code.http_status() < 500 {
                    ErrorCode::Internal
                } else {
                    code
                };
                ApiError::new(
                    code,
                    format!("the platform could not run the function: {}", reply.error),
                )
                .into_response()
            }
        };
        let h = resp.headers_mut();
        h.insert(
            "x-ferry-function",
            HeaderValue::from_str(shown_name).unwrap_or(HeaderValue::from_static("?")),
        );
        h.insert("x-ferry-version", HeaderValue::from(version.version));
        if let Some(v) = alias.and_then(|a| HeaderValue::from_str(a).ok()) {
            h.insert("x-ferry-alias", v);
        }
        h.insert("x-ferry-duration-us", HeaderValue::from(reply.duration_us));
        h.insert(
            "x-ferry-cold",
            HeaderValue::from_static(if reply.cold { "true" } else { "false" }),
        );
        if let Ok(v) = HeaderValue::from_str(&reply.node_id) {
            h.insert("x-ferry-node", v);
        }
        if !reply.log_tail.is_empty()
            && log_tail
            && let Ok(v) = HeaderValue::from_str(&base64(reply.log_tail.as_bytes()))
        {
            h.insert("x-ferry-log-tail", v);
        }
        resp
    }
}

/// A 429 with `Retry-After` (seconds) and `X-Ferry-Limit` (which limit), counted.
pub(crate) fn throttled(st: &AppState, t: crate::limits::Throttled) -> Response {
    let (err, reason, secs) = t.into_api_error();
    st.metrics
        .rejections
        .with_label_values(&[reason.as_str()])
        .inc();
    let mut r = err.into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r.headers_mut()
        .insert("x-ferry-limit", HeaderValue::from_static(reason.as_str()));
    r
}

fn looks_like_json(b: &[u8]) -> bool {
    matches!(
        b.iter().find(|c| !c.is_ascii_whitespace()),
        Some(b'{') | Some(b'[')
    )
}

/// Standard base64 (for log tails in headers).
fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Streams a package (never whole in memory: every node fetches each new version).
async fn get_package(State(st): St, who: Who, Path(sha): Path<String>) -> ApiResult<Response> {
    who.require_admin()?;
    let (file, len) = st.blobs.open(&sha).await?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
    Ok((
        [
            (header::CONTENT_TYPE, "application/gzip".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

async fn list_clusters(State(st): St, who: Who) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    Ok(Json(json!({ "clusters": st.router.table().clusters })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn qualifiers() {
        assert_eq!(split_qualifier("hello"), ("hello", Qualifier::Latest));
        assert_eq!(split_qualifier("hello:3"), ("hello", Qualifier::Version(3)));
        assert_eq!(
            split_qualifier("hello:prod"),
            ("hello", Qualifier::Alias("prod".into()))
        );
    }

    #[test]
    fn component_validation_refuses_core_modules_and_garbage() {
        let core = b"\0asm\x01\0\0\0";
        assert_eq!(
            validate_component(core).unwrap_err().code,
            ErrorCode::InvalidWasm
        );
        assert_eq!(
            validate_component(b"hello").unwrap_err().code,
            ErrorCode::InvalidWasm
        );
    }
}
