//! Callback delivery: when a task that named a callback URL ends, some gateway POSTs its
//! result there, at least once.
//!
//! The callback key is written in the same transaction as the task, so an acknowledged
//! task never loses its callback. Every gateway watches the (small) set of pending
//! callbacks; one claims a callback of an ended task by compare-and-swap (for 30 s),
//! POSTs, and deletes the key fenced on its claim, or backs off and retries (8 tries,
//! doubling from 1 s). A gateway that dies mid-delivery lets its claim lapse.
//!
//! The POST: the output as the body (the error message for a failed task), and headers
//! `X-Call-Id` (the task id), `X-Function-Status` (200 when it succeeded, else 500),
//! `X-Ferry-Task-State`.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::keys;
use ferry_core::model::CallbackRecord;
use ferry_core::task::{TaskRecord, TaskState};
use ferry_store::{Compare, Op, Revision, Store, Txn, WatchCache};

use crate::AppState;

const TICK: Duration = Duration::from_millis(200);
const CLAIM_MS: u64 = 30_000;
const MAX_ATTEMPTS: u32 = 8;
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until the gateway stops.
pub async fn run(st: Arc<AppState>) {
    let cache = loop {
        match WatchCache::start(st.store.clone(), keys::CALLBACKS).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "callbacks: cannot watch; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let http = reqwest::Client::builder()
        .timeout(POST_TIMEOUT)
        .build()
        .unwrap_or_default();
    loop {
        tokio::time::sleep(TICK).await;
        for kv in cache.snapshot() {
            let Ok(rec) = serde_json::from_slice::<CallbackRecord>(&kv.value) else {
                continue;
            };
            let now = ferry_core::now_ms();
            if rec.next_ms > now || rec.claimed_until_ms > now {
                continue;
            }
            let task = match st.store.get(&keys::task(&rec.task_id)).await {
                Ok(Some(t)) => serde_json::from_slice::<TaskRecord>(&t.value).ok(),
                Ok(None) => {
                    // The task is gone: nothing will ever be delivered.
                    let _ = delete(st.store.as_ref(), &kv.key, kv.mod_revision).await;
                    continue;
                }
                Err(_) => continue,
            };
            let Some(task) = task.filter(|t| t.state.is_final()) else {
                continue;
            };
            let mut claimed = rec.clone();
            claimed.claimed_by = Some(st.cfg.id.clone());
            claimed.claimed_until_ms = now + CLAIM_MS;
            let r = st
                .store
                .txn(
                    Txn::new()
                        .when(Compare::mod_revision(&kv.key, kv.mod_revision))
                        .then(Op::put(
                            &kv.key,
                            serde_json::to_vec(&claimed).unwrap_or_default(),
                        )),
                )
                .await;
            let Ok(r) = r else { continue };
            if !r.succeeded {
                continue;
            }
            let (store, http, key) = (st.store.clone(), http.clone(), kv.key.clone());
            tokio::spawn(async move {
                deliver(store.as_ref(), &http, &key, r.revision, claimed, &task).await;
            });
        }
    }
}

async fn delete(store: &dyn Store, key: &str, rev: Revision) -> bool {
    store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(key, rev))
                .then(Op::delete(key)),
        )
        .await
        .is_ok_and(|r| r.succeeded)
}

async fn deliver(
    store: &dyn Store,
    http: &reqwest::Client,
    key: &str,
    rev: Revision,
    mut rec: CallbackRecord,
    task: &TaskRecord,
) {
    let ok = task.state == TaskState::Succeeded;
    let body = if ok {
        task.output.clone().unwrap_or_default()
    } else {
        task.error
            .clone()
            .unwrap_or_else(|| task.state.as_str().to_string())
            .into_bytes()
    };
    let json = matches!(
        body.iter().find(|c| !c.is_ascii_whitespace()),
        Some(b'{') | Some(b'[')
    );
    let sent = http
        .post(&rec.url)
        .header("x-call-id", &task.id)
        .header("x-function-status", if ok { "200" } else { "500" })
        .header("x-ferry-task-state", task.state.as_str())
        .header(
            "content-type",
            if json {
                "application/json"
            } else {
                "application/octet-stream"
            },
        )
        .body(body)
        .send()
        .await;
    // A 4xx is the receiver's answer: delivered. Transport errors and 5xx are retried.
    let delivered = sent.as_ref().is_ok_and(|r| r.status().as_u16() < 500);
    rec.attempts += 1;
    if delivered || rec.attempts >= MAX_ATTEMPTS {
        if !delivered {
            tracing::warn!(task_id = %task.id, attempts = rec.attempts, "callback given up");
        }
        delete(store, key, rev).await;
        return;
    }
    let backoff = 1000u64 << (rec.attempts - 1).min(10);
    rec.next_ms = ferry_core::now_ms() + backoff;
    rec.claimed_by = None;
    rec.claimed_until_ms = 0;
    let _ = store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(key, rev))
                .then(Op::put(key, serde_json::to_vec(&rec).unwrap_or_default())),
        )
        .await;
}
