//! The AWS Lambda Invoke API: `POST /2015-03-31/functions/{name}/invocations`, as boto3
//! and the aws-cli call it. Requests are SigV4-signed with a tenant key's pair (see
//! [`crate::sigv4`]); `Authorization: Bearer` works too; unsigned requests are refused
//! unless the operator allows them (`allow_unsigned_compat`, admin scope).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferry_core::{Error, ErrorCode};
use serde_json::json;

use crate::AppState;
use crate::api::{RequestId, bearer, invoke_sync, read_body};
use crate::catalog::Qualifier;
use crate::sigv4;
use crate::tasks::submit_task;
use crate::tenancy::Principal;

/// A Lambda-style error: status, `X-Amzn-ErrorType`, JSON body.
fn aws_error(status: u16, kind: &str, message: &str) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({ "Type": "User", "message": message })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(kind) {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    r
}

/// Ferry's error codes as Lambda's exceptions.
fn translate(err: &Error, headers: &HeaderMap) -> Response {
    let (status, kind) = match err.code {
        ErrorCode::FunctionNotFound | ErrorCode::VersionNotFound | ErrorCode::NotFound => {
            (404, "ResourceNotFoundException")
        }
        ErrorCode::RateLimited => (429, "TooManyRequestsException"),
        ErrorCode::PayloadTooLarge => (413, "RequestTooLargeException"),
        ErrorCode::InvalidJson | ErrorCode::BadRequest | ErrorCode::UnsupportedMediaType => {
            (400, "InvalidRequestContentException")
        }
        ErrorCode::Unauthorized => (403, "UnrecognizedClientException"),
        ErrorCode::Forbidden => (403, "AccessDeniedException"),
        ErrorCode::Conflict => (409, "ResourceConflictException"),
        ErrorCode::NoCapacity | ErrorCode::Unavailable => (503, "ServiceException"),
        _ => (500, "ServiceException"),
    };
    let mut r = aws_error(status, kind, &err.message);
    if err.code == ErrorCode::RateLimited {
        let reason = match headers.get("x-ferry-limit").and_then(|v| v.to_str().ok()) {
            Some("function_concurrency") => "ReservedFunctionConcurrentInvocationLimitExceeded",
            Some("function_qps") => "FunctionInvocationRateLimitExceeded",
            _ => "CallerRateLimitExceeded",
        };
        let retry = headers.get(header::RETRY_AFTER).cloned();
        r = (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({
                "Type": "User",
                "message": err.message,
                "Reason": reason,
                "retryAfterSeconds": retry.as_ref().and_then(|v| v.to_str().ok()),
            })),
        )
            .into_response();
        r.headers_mut().insert(
            "x-amzn-errortype",
            HeaderValue::from_static("TooManyRequestsException"),
        );
        if let Some(v) = retry {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

/// `arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]`, `NAME:QUALIFIER` or
/// `NAME` → (name, qualifier).
fn function_name(raw: &str) -> (&str, Option<&str>) {
    let tail = match raw.find(":function:") {
        Some(i) if raw.starts_with("arn:") => &raw[i + ":function:".len()..],
        _ => raw,
    };
    match tail.split_once(':') {
        Some((n, q)) => (n, Some(q)),
        None => (tail, None),
    }
}

/// Who signed the request, or the refusal to send.
async fn authenticate(
    st: &AppState,
    req: Request,
) -> Result<(Principal, HeaderMap, Bytes), Response> {
    let (parts, body) = req.into_parts();
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let headers = parts.headers.clone();
    let read = |limit| async move { read_body(&headers, body, limit).await };
    if auth.starts_with("AWS4-HMAC-SHA256") {
        let Some(a) = sigv4::parse_authorization(&auth) else {
            return Err(aws_error(
                403,
                "InvalidSignatureException",
                "malformed AWS4-HMAC-SHA256 authorization",
            ));
        };
        let Some(tenant) = sigv4::key_id_of(&a.access_key_id)
            .and_then(|id| st.directory.by_key_id(&id).map(|t| (t, id)))
        else {
            return Err(aws_error(
                403,
                "UnrecognizedClientException",
                "the security token included in the request is invalid",
            ));
        };
        let amz_date = parts
            .headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let fresh = sigv4::parse_amz_date(&amz_date)
            .is_some_and(|t| t.abs_diff(ferry_core::now_ms()) <= sigv4::MAX_SKEW_MS);
        if !fresh || !amz_date.starts_with(&a.date) {
            return Err(aws_error(
                403,
                "InvalidSignatureException",
                "signature expired or X-Amz-Date missing",
            ));
        }
        let method = parts.method.to_string();
        let raw_path = parts.uri.path().to_string();
        let raw_query = parts.uri.query().unwrap_or("").to_string();
        let body = read(st.cfg.max_body)
            .await
            .map_err(|e| translate(&e.0, &HeaderMap::new()))?;
        let payload_sha256 = ferry_core::id::sha256_hex(&body);
        let header_list: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let expected = sigv4::signature(
            &sigv4::Signed {
                method: &method,
                raw_path: &raw_path,
                raw_query: &raw_query,
                headers: &header_list,
                payload_sha256: &payload_sha256,
            },
            &a,
            &amz_date,
            &sigv4::secret_access_key(&st.cfg.token, &tenant.1),
        );
        if !ferry_core::id::constant_time_eq(expected.as_bytes(), a.signature.as_bytes()) {
            return Err(aws_error(
                403,
                "InvalidSignatureException",
                "the request signature does not match",
            ));
        }
        return Ok((Principal::Tenant(tenant.0), parts.headers, body));
    }
    let principal = if auth.is_empty() {
        st.cfg.allow_unsigned_compat.then_some(Principal::Admin)
    } else {
        bearer(st, &parts.headers)
    };
    let Some(principal) = principal else {
        return Err(aws_error(
            403,
            "UnrecognizedClientException",
            "the request is not signed with a valid key",
        ));
    };
    let body = read(st.cfg.max_body)
        .await
        .map_err(|e| translate(&e.0, &HeaderMap::new()))?;
    Ok((principal, parts.headers, body))
}

pub async fn invoke(
    State(st): State<Arc<AppState>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    Path(function): Path<String>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Response {
    let (who, headers, body) = match authenticate(&st, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (name, mut qualifier) = function_name(&function);
    let query_qualifier = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == "Qualifier")
        .map(|(_, v)| v.to_string());
    if let Some(q) = query_qualifier.as_deref() {
        qualifier = Some(q);
    }
    let qualified = Qualifier::parse(qualifier);
    if !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return aws_error(
            400,
            "InvalidRequestContentException",
            "could not parse request body into json",
        );
    }
    let kind = headers
        .get("x-amz-invocation-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("RequestResponse");
    // An invocation is held to the tenant's rate first (a dry run is not one).
    if matches!(kind, "Event" | "RequestResponse")
        && let Err(t) = st.limiter.admit_tenant(&who)
    {
        return from_native(crate::api::throttled(&st, t)).await;
    }
    match kind {
        "DryRun" => match st.catalog.resolve(&who.internal(name), &qualified).await {
            Ok(_) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => translate(&e, &HeaderMap::new()),
        },
        "Event" => {
            let r = submit_task(
                &st,
                &who,
                &rid.0,
                name,
                &qualified,
                &headers,
                Body::from(body),
                ferry_core::task::CallbackStyle::Ferry,
            )
            .await;
            match r {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    let mut out = StatusCode::ACCEPTED.into_response();
                    if let Some(v) = resp.headers().get("x-ferry-version") {
                        out.headers_mut()
                            .insert("x-amz-executed-version", v.clone());
                    }
                    out
                }
                Ok(resp) => from_native(resp).await,
                Err(e) => translate(&e.0, &HeaderMap::new()),
            }
        }
        "RequestResponse" => {
            let tail = headers
                .get("x-amz-log-type")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"tail"));
            match invoke_sync(
                &st,
                &who,
                &rid.0,
                name,
                &qualified,
                &headers,
                Body::from(body),
                tail,
                vec![],
            )
            .await
            {
                Ok(resp) => from_native(resp).await,
                Err(e) => translate(&e.0, &HeaderMap::new()),
            }
        }
        other => aws_error(
            400,
            "InvalidParameterValueException",
            &format!("X-Amz-Invocation-Type {other:?}: expected RequestResponse, Event or DryRun"),
        ),
    }
}

/// A native answer as Lambda gives it.
async fn from_native(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let version = parts.headers.get("x-ferry-version").cloned();
    let log = parts.headers.get("x-ferry-log-tail").cloned();
    let mut out = match parts.extensions.get::<Error>() {
        // The function ran and failed (or ran out of time): 200, with the error in the
        // body and X-Amz-Function-Error, as Lambda answers.
        Some(e) if matches!(e.code, ErrorCode::FunctionError | ErrorCode::Timeout) => {
            let kind = if e.code == ErrorCode::Timeout {
                "TimeoutError"
            } else {
                "Error"
            };
            let mut r =
                axum::Json(json!({ "errorMessage": e.message, "errorType": kind })).into_response();
            r.headers_mut().insert(
                "x-amz-function-error",
                HeaderValue::from_static("Unhandled"),
            );
            r
        }
        Some(e) => return translate(e, &parts.headers),
        None => {
            let mut r = Response::new(body);
            if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
                r.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            for k in ["idempotent-replayed", "x-ferry-idempotency"] {
                if let Some(v) = parts.headers.get(k) {
                    r.headers_mut().insert(k, v.clone());
                }
            }
            r
        }
    };
    let h = out.headers_mut();
    if let Some(v) = version {
        h.insert("x-amz-executed-version", v);
    }
    if let Some(v) = log {
        h.insert("x-amz-log-result", v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_in_every_form() {
        assert_eq!(function_name("hello"), ("hello", None));
        assert_eq!(function_name("hello:prod"), ("hello", Some("prod")));
        assert_eq!(
            function_name("arn:aws:lambda:us-east-1:123456789012:function:hello:3"),
            ("hello", Some("3"))
        );
        assert_eq!(
            function_name("arn:aws:lambda:us-east-1:123456789012:function:hello"),
            ("hello", None)
        );
    }
}
