//! Idempotency keys on synchronous invocations, kept in the store so they hold across
//! gateway replicas and restarts.
//!
//! The first call with a key writes a `running` entry (the key's sha256 under
//! `/ferry/idem/invoke/`, the body's hash, a deadline), runs the function, and stores
//! the answer in the entry. A repeat within the window with the same body returns the
//! stored answer, or, while the first call still runs, waits for it (it "attaches");
//! with another body it is `409 conflict`. An entry still running past its deadline
//! (its gateway died) is taken over by the next repeat, which runs the function again.
//! A call that certainly did not run (no capacity, store or order-server unreachable)
//! leaves no entry, so the caller's retry runs.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferry_core::{Error, ErrorCode};
use ferry_store::{Compare, Op, Revision, Store, Txn};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};

/// The largest answer kept for repeats.
pub const MAX_STORED: usize = 1 << 20;

/// `Idempotency-Key`: 1–256 printable ASCII characters.
pub fn key_from(headers: &HeaderMap) -> ApiResult<Option<String>> {
    match headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::trim))
    {
        None => Ok(None),
        Some(Ok(k))
            if !k.is_empty() && k.len() <= 256 && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(k.to_string()))
        }
        Some(_) => Err(ApiError::new(
            ErrorCode::BadRequest,
            "Idempotency-Key must be 1-256 printable ASCII characters",
        )),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    body_sha256: String,
    created_ms: u64,
    /// Past this, a still-running entry is abandoned and may be taken over.
    deadline_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Stored>,
}

/// An answer as kept for repeats.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    status: u16,
    headers: Vec<(String, String)>,
    body_base64: String,
    /// For error answers: the code and message (the body is rebuilt with the repeat's
    /// request id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<(String, String)>,
}

/// How a repeat was answered (the `X-Ferry-Idempotency` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// The first call had finished: its stored answer.
    Stored,
    /// The first call was still running: this one waited for its answer.
    Attached,
}

impl Stored {
    pub fn into_response(self, how: Replay) -> Response {
        let mut resp = match &self.error {
            Some((code, message)) => ApiError::new(
                ErrorCode::parse(code).unwrap_or(ErrorCode::Internal),
                message.clone(),
            )
            .into_response(),
            None => {
                let body = base64::engine::general_purpose::STANDARD
                    .decode(&self.body_base64)
                    .unwrap_or_default();
                let mut r = Response::new(Body::from(body));
                *r.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
                r
            }
        };
        let h = resp.headers_mut();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                h.insert(k, v);
            }
        }
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
        h.insert(
            "x-ferry-idempotency",
            HeaderValue::from_static(match how {
                Replay::Stored => "replayed",
                Replay::Attached => "attached",
            }),
        );
        resp
    }
}

/// What the first look at a key decided.
pub enum Begin {
    /// Run the function; the entry (created at this time) is ours at this revision.
    Run { revision: Revision, created_ms: u64 },
    /// Answer with what the first call answered.
    Replay(Stored, Replay),
}

fn conflict() -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        "this Idempotency-Key was already used with a different body",
    )
}

/// Claims `key` for a call with this body, or finds the answer to give instead. Waits
/// while another call with the key runs (until its deadline, then takes it over).
pub async fn begin(
    store: &dyn Store,
    key: &str,
    body_sha256: &str,
    run_for: Duration,
    window: Duration,
) -> ApiResult<Begin> {
    let mut attached = false;
    let mut pause = Duration::from_millis(10);
    // Bounded: each round either decides or waits; a running entry's deadline ends the
    // waiting (takeover), and a lost race only repeats the look.
    let give_up = tokio::time::Instant::now() + run_for * 2 + Duration::from_secs(10);
    while tokio::time::Instant::now() < give_up {
        let now = ferry_core::now_ms();
        let fresh = Entry {
            body_sha256: body_sha256.to_string(),
            created_ms: now,
            deadline_ms: now + run_for.as_millis() as u64,
            result: None,
        };
        let value = serde_json::to_vec(&fresh).unwrap_or_default();
        let guard = match store.get(key).await? {
            None => Compare::absent(key),
            Some(kv) => match serde_json::from_slice::<Entry>(&kv.value) {
                Ok(e) if now.saturating_sub(e.created_ms) < window.as_millis() as u64 => {
                    if e.body_sha256 != body_sha256 {
                        return Err(conflict());
                    }
                    if let Some(stored) = e.result {
                        let how = if attached {
                            Replay::Attached
                        } else {
                            Replay::Stored
                        };
                        return Ok(Begin::Replay(stored, how));
                    }
                    if now < e.deadline_ms {
                        attached = true;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(200));
                        continue;
                    }
                    // Abandoned by its gateway: take it over.
                    Compare::mod_revision(key, kv.mod_revision)
                }
                // Expired (or unreadable): the key may be used again.
                _ => Compare::mod_revision(key, kv.mod_revision),
            },
        };
        let r = store
            .txn(Txn::new().when(guard).then(Op::put(key, value)))
            .await?;
        if r.succeeded {
            return Ok(Begin::Run {
                revision: r.revision,
                created_ms: now,
            });
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        "another call with this Idempotency-Key is still running; retry later",
    ))
}

/// Errors after which the function certainly did not run: the key is released.
fn not_run(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::NoCapacity | ErrorCode::Unavailable | ErrorCode::RateLimited
    )
}

/// Keeps the answer of the call that claimed `key` at `rev` (or releases the key when
/// the function did not run) and returns the answer to send.
pub async fn finish(
    store: &dyn Store,
    key: &str,
    rev: Revision,
    body_sha256: &str,
    created_ms: u64,
    resp: Response,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    let error = parts.extensions.get::<Error>().cloned();
    if error.as_ref().is_some_and(|e| not_run(e.code)) {
        let _ = store
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(key, rev))
                    .then(Op::delete(key)),
            )
            .await;
        return Response::from_parts(parts, body);
    }
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            let _ = store
                .txn(
                    Txn::new()
                        .when(Compare::mod_revision(key, rev))
                        .then(Op::delete(key)),
                )
                .await;
            return ApiError::from(Error::internal(format!("read the answer: {e}")))
                .into_response();
        }
    };
    let stored = if bytes.len() > MAX_STORED {
        Stored {
            status: 409,
            headers: vec![],
            body_base64: String::new(),
            error: Some((
                ErrorCode::Conflict.as_str().into(),
                format!(
                    "the first answer to this Idempotency-Key was larger than {MAX_STORED} bytes and is not kept; use a new key"
                ),
            )),
        }
    } else {
        Stored {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter(|(k, _)| *k != header::CONTENT_LENGTH && k.as_str() != "x-request-id")
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                .collect(),
            body_base64: base64::engine::general_purpose::STANDARD.encode(&bytes),
            error: error.map(|e| (e.code.as_str().to_string(), e.message)),
        }
    };
    let entry = Entry {
        body_sha256: body_sha256.to_string(),
        created_ms,
        deadline_ms: created_ms,
        result: Some(stored),
    };
    let r = store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(key, rev))
                .then(Op::put(key, serde_json::to_vec(&entry).unwrap_or_default())),
        )
        .await;
    if !matches!(r, Ok(ref r) if r.succeeded) {
        tracing::warn!("an idempotent answer could not be kept (taken over, or the store failed)");
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(key_from(&h).unwrap(), None);
        h.insert("idempotency-key", HeaderValue::from_static("abc-1"));
        assert_eq!(key_from(&h).unwrap().as_deref(), Some("abc-1"));
        h.insert("idempotency-key", HeaderValue::from_static("has space"));
        assert!(key_from(&h).is_err());
    }

    #[test]
    fn a_stored_error_replays_as_the_same_error() {
        let s = Stored {
            status: 502,
            headers: vec![("x-ferry-version".into(), "3".into())],
            body_base64: String::new(),
            error: Some(("function_error".into(), "boom".into())),
        };
        let r = s.into_response(Replay::Stored);
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()["x-ferry-version"], "3");
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        assert_eq!(
            r.extensions().get::<Error>().map(|e| e.code),
            Some(ErrorCode::FunctionError)
        );
    }
}
