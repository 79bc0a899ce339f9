//! OpenFaaS's invocation paths: `ANY /function/{name}[/…]` (synchronous) and
//! `POST /async-function/{name}[/…]` (202 with `X-Call-Id`; `X-Callback-Url` receives the
//! result with `X-Function-Status` and `X-Call-Id`). The request body is the function's
//! input, as with OpenFaaS's classic watchdog; the answer is the output. Authentication:
//! `Authorization: Bearer` (admin token or tenant key), or Basic with the key as the
//! password; unsigned only where the operator allows it.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferry_core::Error;

use crate::AppState;
use crate::api::{RequestId, bearer, invoke_sync, split_qualifier};
use crate::tasks::submit_task;
use crate::tenancy::Principal;

fn text(status: u16, msg: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{msg}\n"),
    )
        .into_response()
}

/// Who the request acts for; `None`: refuse it (401).
fn who(st: &AppState, headers: &HeaderMap) -> Option<Principal> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth.is_empty() {
        return st.cfg.allow_unsigned_compat.then_some(Principal::Admin);
    }
    if let Some(b) = auth
        .strip_prefix("Basic ")
        .or_else(|| auth.strip_prefix("basic "))
    {
        // Basic USER:KEY: the key is the password (the user is ignored).
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .unwrap_or_default();
        let key = decoded.split_once(':').map_or("", |(_, p)| p);
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
            h.insert(header::AUTHORIZATION, v);
        }
        return bearer(st, &h);
    }
    bearer(st, headers)
}

fn unauthorized() -> Response {
    text(
        401,
        "unauthorized: send a key as a Bearer token (or as a Basic password)",
    )
}

/// A native error as OpenFaaS answers it: its status and a line of text.
fn error_text(e: &Error) -> Response {
    use ferry_core::ErrorCode as C;
    let status = match e.code {
        C::FunctionError | C::Timeout => 500,
        c => c.http_status(),
    };
    text(status, &e.message)
}

/// Headers passed on at most (more are dropped), and the longest value passed.
const MAX_ENV_HEADERS: usize = 64;
const MAX_ENV_VALUE: usize = 4096;

/// The request as OpenFaaS's classic watchdog hands it to a process: `Http_Method`,
/// `Http_Path` (what follows `/function/{name}`, from `/`), `Http_Query` (raw) and
/// each header as `Http_<Canonical_Name>` (`X-Trace-Id` → `Http_X_Trace_Id`). Ferry's
/// own credentials (`Authorization`, `Cookie`) are not passed to the function.
fn request_env(
    method: &axum::http::Method,
    sub_path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Vec<ferry_core::proto::EnvVar> {
    let var = |name: String, value: &str| ferry_core::proto::EnvVar {
        name,
        value: value.chars().take(MAX_ENV_VALUE).collect(),
    };
    let mut env = vec![
        var("Http_Method".into(), method.as_str()),
        var("Http_Path".into(), &format!("/{sub_path}")),
    ];
    if let Some(q) = query {
        env.push(var("Http_Query".into(), q));
    }
    for (k, v) in headers.iter().take(MAX_ENV_HEADERS) {
        if k == header::AUTHORIZATION || k == header::COOKIE {
            continue;
        }
        let Ok(v) = v.to_str() else { continue };
        let canonical: Vec<String> = k
            .as_str()
            .split('-')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let mut c = p.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect();
        env.push(var(format!("Http_{}", canonical.join("_")), v));
    }
    env
}

/// A caller over its tenant's rate, as OpenFaaS answers it.
fn refused(st: &AppState, t: crate::limits::Throttled) -> Response {
    let r = crate::api::throttled(st, t);
    match r.extensions().get::<Error>() {
        Some(e) => error_text(e),
        None => r,
    }
}

/// A path parameter (empty when absent).
fn param<'a>(params: &'a [(String, String)], key: &str) -> &'a str {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// The caller, authenticated and within its tenant's rate; else the refusal.
fn admitted(st: &AppState, headers: &HeaderMap) -> Result<Principal, Box<Response>> {
    let who = who(st, headers).ok_or_else(|| Box::new(unauthorized()))?;
    st.limiter
        .admit_tenant(&who)
        .map_err(|t| Box::new(refused(st, t)))?;
    Ok(who)
}

/// `ANY /function/{name}`.
pub async fn sync(
    State(st): State<Arc<AppState>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let name = param(&params, "name");
    let (parts, body) = req.into_parts();
    let who = match admitted(&st, &parts.headers) {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    let sub_path = param(&params, "path");
    let env = request_env(&parts.method, sub_path, parts.uri.query(), &parts.headers);
    let (shown, qualified) = split_qualifier(name);
    let started = std::time::Instant::now();
    let resp = match invoke_sync(
        &st,
        &who,
        &rid.0,
        shown,
        &qualified,
        &parts.headers,
        body,
        false,
        env,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return error_text(&e.0),
    };
    let (rparts, rbody) = resp.into_parts();
    let mut out = match rparts.extensions.get::<Error>() {
        Some(e) => error_text(e),
        None => {
            let mut r = Response::new(rbody);
            for k in [
                header::CONTENT_TYPE.as_str(),
                "idempotent-replayed",
                "x-ferry-idempotency",
                "x-ferry-alias",
            ] {
                if let Some(v) = rparts.headers.get(k) {
                    r.headers_mut().insert(k, v.clone());
                }
            }
            r
        }
    };
    let h = out.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&rid.0) {
        h.insert("x-call-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{:.6}", started.elapsed().as_secs_f64())) {
        h.insert("x-duration-seconds", v);
    }
    if let Some(v) = rparts.headers.get("x-ferry-version") {
        h.insert("x-ferry-version", v.clone());
    }
    out
}

/// `POST /async-function/{name}`.
pub async fn submit(
    State(st): State<Arc<AppState>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let name = param(&params, "name");
    let (parts, body) = req.into_parts();
    let who = match admitted(&st, &parts.headers) {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    let mut headers = parts.headers.clone();
    if let Some(url) = parts.headers.get("x-callback-url") {
        headers.insert("x-ferry-callback-url", url.clone());
    }
    let (shown, qualified) = split_qualifier(name);
    let resp = match submit_task(
        &st,
        &who,
        &rid.0,
        shown,
        &qualified,
        &headers,
        body,
        ferry_core::task::CallbackStyle::Openfaas,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return error_text(&e.0),
    };
    if let Some(e) = resp.extensions().get::<Error>() {
        return error_text(e);
    }
    let task_id = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| l.rsplit('/').next())
        .unwrap_or_default()
        .to_string();
    let mut out = StatusCode::ACCEPTED.into_response();
    if let Ok(v) = HeaderValue::from_str(&task_id) {
        out.headers_mut().insert("x-call-id", v);
    }
    if let Some(v) = resp.headers().get("x-ferry-version") {
        out.headers_mut().insert("x-ferry-version", v.clone());
    }
    out
}
