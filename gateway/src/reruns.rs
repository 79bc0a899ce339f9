//! Batch re-runs: `POST /v1/reruns` selects a function's tasks (by version, state and
//! creation time) and submits each one's input again as a new task in the `reruns`
//! queue (or the one named): batch priority class, which order-servers claim after
//! online work, and its own MRT, so a big re-run never takes every node; `GET
//! /v1/reruns/{id}` tracks the new tasks.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_core::model::RerunRecord;
use ferry_core::task::{TaskRecord, TaskState};
use ferry_core::{Error, ErrorCode, keys};
use ferry_store::{Compare, Op, Txn};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::AppState;
use crate::api::{RequestId, parse_json, read_body};
use crate::error::{ApiError, ApiResult};
use crate::tenancy::Principal;

type St = State<Arc<AppState>>;
type Who = axum::Extension<Principal>;

/// Most tasks one re-run may select.
const MAX_SELECTED: usize = 10_000;
/// Tasks committed per transaction (4 operations each, under etcd's 128).
const BATCH: usize = 32;

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    function: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
    /// The queue the new tasks wait in (default `reruns`: batch class, its own MRT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
}

pub async fn create(
    State(st): St,
    who: Who,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let bytes = read_body(&headers, body, 64 << 10).await?;
    let sel: Selection = parse_json(&bytes)?;
    let state =
        match sel.state.as_deref() {
            None => None,
            Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
                ApiError::new(ErrorCode::BadRequest, format!("unknown state {s:?}"))
            })?),
        };
    let limit = sel.limit.unwrap_or(1000).clamp(1, MAX_SELECTED);
    let internal = who.internal(&sel.function);
    st.catalog.function(&internal).await?;
    let queue = st.queues.resolve(
        &who,
        Some(
            sel.queue
                .as_deref()
                .unwrap_or(ferry_core::model::RERUN_QUEUE),
        ),
    )?;
    // Oldest first, so the re-run keeps the original order.
    let selected: Vec<TaskRecord> = crate::task_list::select_oldest(
        &st.store,
        &internal,
        sel.since_ms,
        sel.until_ms,
        limit,
        |t| {
            sel.version.is_none_or(|v| t.version.version == v) && state.is_none_or(|s| t.state == s)
        },
    )
    .await?;
    let cluster = st.router.pick_cluster();
    if cluster.is_none() && !selected.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoCapacity,
            "no cluster is registered yet; start an order-server",
        ));
    }
    let cluster = cluster.unwrap_or_default();
    let now = ferry_core::now_ms();
    let mut pairs = vec![];
    for chunk in selected.chunks(BATCH) {
        let mut txn = Txn::new();
        let mut batch = vec![];
        for old in chunk {
            let mut t = TaskRecord::new(
                ferry_core::id::new_id(),
                old.version.clone(),
                cluster.clone(),
                queue.priority,
                old.input.clone(),
                now,
            );
            t.request_id = rid.0.clone();
            t.queue = queue.name.clone();
            let tkey = keys::task(&t.id);
            txn = txn
                .when(Compare::absent(&tkey))
                .then(Op::put(&tkey, serde_json::to_vec(&t).unwrap_or_default()))
                .then(Op::put(
                    keys::queued(&cluster, &t.id),
                    serde_json::to_vec(&t.queue_entry()).unwrap_or_default(),
                ));
            for op in crate::task_list::index_puts(&t) {
                txn = txn.then(op);
            }
            batch.push((old.id.clone(), t.id));
        }
        if !st.store.txn(txn).await?.succeeded {
            return Err(Error::internal("a re-run task id collided; retry").into());
        }
        pairs.extend(batch);
    }
    let rec = RerunRecord {
        id: ferry_core::id::new_id(),
        function: internal,
        filter: serde_json::to_value(&sel).unwrap_or_default(),
        selected: pairs.len() as u32,
        tasks: pairs,
        created_ms: now,
    };
    st.store
        .put(
            &keys::rerun(&rec.id),
            serde_json::to_vec(&rec).unwrap_or_default(),
            ferry_store::NO_LEASE,
        )
        .await?;
    tracing::info!(rerun = %rec.id, function = %rec.function, selected = rec.selected, "re-run submitted");
    let url = format!("/v1/reruns/{}", rec.id);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": rec.id,
            "function": who.external(&rec.function),
            "selected": rec.selected,
            "status_url": url,
            "tasks": rec.tasks.iter().map(|(old, new)| json!({"original": old, "task_id": new})).collect::<Vec<_>>(),
        })),
    )
        .into_response())
}

/// Progress: the new tasks counted by state.
pub async fn get(
    State(st): St,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let missing = || ApiError::new(ErrorCode::NotFound, format!("re-run {id:?} not found"));
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(missing());
    }
    let kv = st.store.get(&keys::rerun(&id)).await?.ok_or_else(missing)?;
    let rec: RerunRecord = serde_json::from_slice(&kv.value)
        .map_err(|e| Error::internal(format!("re-run record: {e}")))?;
    if !who.owns(&rec.function) {
        return Err(missing());
    }
    let mut states: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut finished = 0u32;
    for (_, new) in &rec.tasks {
        let state = match st.store.get(&keys::task(new)).await? {
            Some(kv) => serde_json::from_slice::<TaskRecord>(&kv.value)
                .map(|t| t.state)
                .ok(),
            None => None,
        };
        let name = state.map_or("missing", |s| s.as_str());
        if state.is_some_and(|s| s.is_final()) {
            finished += 1;
        }
        *states.entry(name).or_default() += 1;
    }
    Ok(Json(json!({
        "id": rec.id,
        "function": who.external(&rec.function),
        "filter": rec.filter,
        "selected": rec.selected,
        "finished": finished,
        "done": finished == rec.selected,
        "states": states,
        "created_ms": rec.created_ms,
    })))
}
