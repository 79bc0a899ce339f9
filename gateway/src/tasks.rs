//! The async task API: submit (answered 202 only once the task is committed), read,
//! list, cancel. Order-servers do the rest through the store.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferry_core::task::{Priority, QueueEntry, TaskRecord, TaskState};
use ferry_core::{ErrorCode, keys};
use ferry_store::{Compare, KeyValue, Op, Txn};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::AppState;
use crate::api::{RequestId, is_json, parse_json, read_body, split_qualifier};
use crate::error::{ApiError, ApiResult};
use crate::tenancy::Principal;

type Who = axum::Extension<Principal>;

/// Largest async input kept with the task.
pub const MAX_TASK_INPUT: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
struct IdempotencyEntry {
    task_id: String,
    body_sha256: String,
    created_ms: u64,
}

/// The JSON view of a task as `who` sees it (input left out; output inline when it is
/// JSON).
pub fn view(who: &Principal, t: &TaskRecord) -> serde_json::Value {
    let mut v = json!({
        "id": t.id,
        "function": who.external(&t.function),
        "version": t.version.version,
        "cluster": t.cluster,
        "state": t.state.as_str(),
        "priority": t.priority,
        "attempt": t.attempt,
        "attempts": t.attempts,
        "created_ms": t.created_ms,
        "updated_ms": t.updated_ms,
    });
    if !t.queue.is_empty() {
        v["queue"] = json!(who.external(&t.queue));
    }
    if t.cancel_requested && !t.state.is_final() {
        v["cancel_requested"] = json!(true);
    }
    if t.state == TaskState::Queued && t.not_before_ms > t.updated_ms {
        v["not_before_ms"] = json!(t.not_before_ms);
    }
    if let Some(e) = &t.error {
        v["error"] = json!(e);
    }
    if let Some(c) = &t.error_code {
        v["error_code"] = json!(c);
    }
    if !t.log_tail.is_empty() {
        v["log_tail"] = json!(t.log_tail);
    }
    if let Some(c) = &t.callback {
        v["callback"] = json!(c);
    }
    if let Some(out) = &t.output {
        use base64::Engine;
        v["output_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(out));
        if let Ok(j) = serde_json::from_slice::<serde_json::Value>(out) {
            v["output"] = j;
        }
    }
    v
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

#[derive(Deserialize)]
pub struct SubmitQuery {
    queue: Option<String>,
}

pub async fn submit(
    State(st): State<Arc<AppState>>,
    who: Who,
    axum::Extension(rid): axum::Extension<RequestId>,
    Path(name): Path<String>,
    Query(q): Query<SubmitQuery>,
    mut headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // `?queue=` is the same as `X-Ferry-Queue` (the header wins).
    if let Some(queue) = q.queue
        && !headers.contains_key("x-ferry-queue")
    {
        let v = HeaderValue::from_str(&queue)
            .map_err(|_| ApiError::new(ErrorCode::BadRequest, "queue: not a valid name"))?;
        headers.insert("x-ferry-queue", v);
    }
    let (shown_name, qualified) = split_qualifier(&name);
    submit_task(
        &st,
        &who,
        &rid.0,
        shown_name,
        &qualified,
        &headers,
        body,
        ferry_core::task::CallbackStyle::Ferry,
    )
    .await
}

/// Submits an async task of `shown_name` (as `who` names it): resolution, limits, the
/// body, priority, callback and idempotency, then the commit; answers the native 202.
/// Shared by the native route and the compatibility routes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn submit_task(
    st: &AppState,
    who: &Principal,
    request_id: &str,
    shown_name: &str,
    qualified: &crate::catalog::Qualifier,
    headers: &HeaderMap,
    body: Body,
    callback_style: ferry_core::task::CallbackStyle,
) -> ApiResult<Response> {
    let internal = who.internal(shown_name);
    let fname = internal.as_str();
    let (version, _alias) = st.catalog.resolve(fname, qualified).await?;
    let queue = st
        .queues
        .resolve(who, header_str(headers, "x-ferry-queue"))?;
    if let Err(t) = st.limiter.admit_function(who, fname) {
        return Ok(crate::api::throttled(st, t));
    }
    if let Err(t) = st.limiter.admit_queue(&queue) {
        return Ok(crate::api::throttled(st, t));
    }
    let input = read_body(headers, body, who.max_body(MAX_TASK_INPUT)).await?;
    if is_json(headers) {
        parse_json::<serde::de::IgnoredAny>(&input)?;
    }
    let priority = match header_str(headers, "x-ferry-priority") {
        None => queue.priority,
        Some(p) => Priority::parse(p).ok_or_else(|| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("X-Ferry-Priority {p:?}: expected critical, normal or batch"),
            )
        })?,
    };
    let callback_url = match header_str(headers, "x-ferry-callback-url") {
        None => None,
        Some(u) if (u.starts_with("http://") || u.starts_with("https://")) && u.len() <= 2048 => {
            Some(u.to_string())
        }
        Some(u) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("X-Ferry-Callback-Url {u:?} is not an http(s) URL"),
            ));
        }
    };
    let idempotency_key = crate::idempotency::key_from(headers)?;
    let window_ms = st.cfg.idempotency_window.as_millis() as u64;
    let cluster = st.router.pick_cluster().ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoCapacity,
            "no cluster is registered yet; start an order-server",
        )
    })?;
    let now = ferry_core::now_ms();
    let mut task = TaskRecord::new(
        ferry_core::id::new_id(),
        (*version).clone(),
        cluster.clone(),
        priority,
        input.to_vec(),
        now,
    );
    task.callback_url = callback_url;
    task.callback_style = callback_style;
    task.request_id = request_id.to_string();
    task.queue = queue.name;
    let body_sha256 = ferry_core::id::sha256_hex(&input);
    let tkey = keys::task(&task.id);
    let base = Txn::new()
        .when(Compare::absent(&tkey))
        .then(Op::put(
            &tkey,
            serde_json::to_vec(&task).unwrap_or_default(),
        ))
        .then(Op::put(
            keys::queued(&cluster, &task.id),
            serde_json::to_vec(&task.queue_entry()).unwrap_or_default(),
        ));
    let [by_function, by_owner] = crate::task_list::index_puts(&task);
    let base = base.then(by_function).then(by_owner);
    let Some(key) = idempotency_key else {
        st.store.txn(base).await?;
        return Ok(accepted(&task.id, Some(&task), false));
    };
    // The key, the task and its queue entry commit together, or not at all.
    let ikey = keys::idempotency("tasks", &format!("{fname}/{key}"));
    let entry = serde_json::to_vec(&IdempotencyEntry {
        task_id: task.id.clone(),
        body_sha256: body_sha256.clone(),
        created_ms: now,
    })
    .unwrap_or_default();
    for _ in 0..4 {
        let existing = st.store.get(&ikey).await?;
        let guard = match &existing {
            Some(kv) => {
                let e: Option<IdempotencyEntry> = serde_json::from_slice(&kv.value).ok();
                match e {
                    Some(e) if now.saturating_sub(e.created_ms) < window_ms => {
                        if e.body_sha256 != body_sha256 {
                            return Err(ApiError::new(
                                ErrorCode::Conflict,
                                "this Idempotency-Key was already used with a different body",
                            ));
                        }
                        // The same task: say where it stands and which version it runs.
                        let t = current(st, who, &e.task_id).await.ok().map(|c| c.task);
                        return Ok(accepted(&e.task_id, t.as_ref(), true));
                    }
                    // Expired: the key may be reused.
                    _ => Compare::mod_revision(&ikey, kv.mod_revision),
                }
            }
            None => Compare::absent(&ikey),
        };
        let txn = Txn {
            compares: [base.compares.clone(), vec![guard]].concat(),
            success: [base.success.clone(), vec![Op::put(&ikey, entry.clone())]].concat(),
            failure: vec![],
        };
        if st.store.txn(txn).await?.succeeded {
            return Ok(accepted(&task.id, Some(&task), false));
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        "concurrent submissions with this Idempotency-Key; retry",
    ))
}

/// The 202 of a submission (or of a repeat of one): the task, the version it runs, and
/// for a repeat its state now.
fn accepted(task_id: &str, task: Option<&TaskRecord>, replayed: bool) -> Response {
    let url = format!("/v1/tasks/{task_id}");
    let mut body = json!({ "task_id": task_id, "status_url": url, "idempotent_replay": replayed });
    let version = task.map(|t| t.version.version);
    if let Some(v) = version {
        body["version"] = json!(v);
    }
    if let Some(t) = task.filter(|_| replayed) {
        body["state"] = json!(t.state.as_str());
    }
    let mut r = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Some(v) = version {
        r.headers_mut()
            .insert("x-ferry-version", HeaderValue::from(v));
    }
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if replayed {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}

/// A task the caller may see; another tenant's task is "not found", like a missing one.
fn task_not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("task {id:?} not found"))
}

fn valid_task_id(id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(task_not_found(id));
    }
    Ok(())
}

/// The task in `kv`, if `who` may see it (else the same 404 as a missing one).
fn owned(who: &Principal, id: &str, kv: Option<KeyValue>) -> ApiResult<(TaskRecord, i64)> {
    let kv = kv.ok_or_else(|| task_not_found(id))?;
    let t: TaskRecord = serde_json::from_slice(&kv.value)
        .map_err(|e| ferry_core::Error::internal(format!("task record: {e}")))?;
    if !who.owns(&t.function) {
        return Err(task_not_found(id));
    }
    Ok((t, kv.mod_revision))
}

/// Lays the claim of the task's queue entry, if it has one, over the record: a claimed
/// task is running, though its record still says queued (order-servers claim by
/// marking the entry and write the record when the attempt ends).
pub(crate) fn with_entry(t: TaskRecord, entry: Option<&KeyValue>) -> TaskRecord {
    match entry
        .and_then(|e| serde_json::from_slice::<QueueEntry>(&e.value).ok())
        .and_then(|e| e.claim)
    {
        Some(c) => t.with_claim(&c),
        None => t,
    }
}

/// A task as it is now, read at one revision: the record with its entry's claim laid
/// over, the record's revision, and (unless it is final) its queue entry, cancel
/// request and progress.
struct Current {
    task: TaskRecord,
    rev: i64,
    entry: Option<KeyValue>,
    cancel: Option<KeyValue>,
    progress: Option<KeyValue>,
}

async fn current(st: &AppState, who: &Principal, id: &str) -> ApiResult<Current> {
    valid_task_id(id)?;
    // The record names the cluster (and so the entry's key): read it, then the rest in
    // a transaction that holds only while the record is unchanged.
    for _ in 0..8 {
        let (task, rev) = owned(who, id, st.store.get(&keys::task(id)).await?)?;
        if task.state.is_final() {
            return Ok(Current {
                task,
                rev,
                entry: None,
                cancel: None,
                progress: None,
            });
        }
        let read = Txn::new()
            .when(Compare::mod_revision(keys::task(id), rev))
            .then(Op::get(keys::queued(&task.cluster, id)))
            .then(Op::get(keys::cancel(id)))
            .then(Op::get(keys::progress(id)));
        let r = st.store.txn(read).await?;
        if !r.succeeded {
            continue;
        }
        let mut gets = r.gets.into_iter();
        let (entry, cancel, progress) = (
            gets.next().flatten(),
            gets.next().flatten(),
            gets.next().flatten(),
        );
        return Ok(Current {
            task: with_entry(task, entry.as_ref()),
            rev,
            entry,
            cancel,
            progress,
        });
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        "the task kept changing; retry",
    ))
}

pub async fn get(
    State(st): State<Arc<AppState>>,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let Current {
        task: mut t,
        cancel,
        progress: progress_kv,
        ..
    } = current(&st, &who, &id).await?;
    let mut progress = None;
    if !t.state.is_final() {
        t.cancel_requested = cancel.is_some();
    }
    if t.state == TaskState::Running
        && let Some(kv) = progress_kv
        && let Ok(p) = serde_json::from_slice::<ferry_core::task::TaskProgress>(&kv.value)
        && p.attempt == t.attempt
    {
        progress = Some(p);
    }
    let mut v = view(&who, &t);
    if let Some(p) = progress {
        v["progress"] = serde_json::json!(p);
    }
    Ok(Json(v))
}

/// Queued: cancelled at once. Running: the owning order-server tells the node to stop,
/// and the task ends `cancelled` when it has. Final: 409.
pub async fn cancel(
    State(st): State<Arc<AppState>>,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    for _ in 0..8 {
        let Current {
            task: mut t,
            rev,
            entry,
            ..
        } = current(&st, &who, &id).await?;
        let now = ferry_core::now_ms();
        let tkey = keys::task(&t.id);
        let qkey = keys::queued(&t.cluster, &t.id);
        // The entry as read: unchanged, or still absent.
        let entry_unchanged = match &entry {
            Some(e) => Compare::mod_revision(&qkey, e.mod_revision),
            None => Compare::absent(&qkey),
        };
        let txn = match t.state {
            s if s.is_final() => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("task {id} is already {}", s.as_str()),
                ));
            }
            TaskState::Queued => {
                t.state = TaskState::Cancelled;
                t.error = Some("cancelled before it ran".into());
                t.updated_ms = now;
                Txn::new()
                    .when(Compare::mod_revision(&tkey, rev))
                    .when(entry_unchanged)
                    .then(Op::put(&tkey, serde_json::to_vec(&t).unwrap_or_default()))
                    .then(Op::delete(qkey))
            }
            _ => {
                // A running task's attempt belongs to its order-server (its completion
                // is a CAS on the claimed entry): only the cancel key is written, and
                // the owner stops the attempt.
                t.cancel_requested = true;
                Txn::new()
                    .when(Compare::mod_revision(&tkey, rev))
                    .when(entry_unchanged)
                    .then(Op::put(
                        keys::cancel(&t.id),
                        serde_json::to_vec(&t.attempt).unwrap_or_default(),
                    ))
            }
        };
        if st.store.txn(txn).await?.succeeded {
            let status = if t.state == TaskState::Cancelled {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            return Ok((status, Json(view(&who, &t))).into_response());
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        "the task kept changing; retry",
    ))
}
