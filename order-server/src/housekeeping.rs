//! Duties one instance per cluster does for everyone: deleting finished tasks past their
//! retention, and delivering task callbacks (signed, retried with backoff).
//!
//! The duty holder is the live instance with the smallest id; everything it works from
//! is in the store, so when it dies the next one carries on (a callback may then be
//! delivered twice: callbacks are at-least-once, and carry the task id to de-duplicate).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_core::keys;
use ferry_core::task::{CallbackRecord, CallbackStatus, CallbackStyle, TaskRecord};
use ferry_store::{Compare, Op, RangeQuery, StoreError, Txn};
use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::service::OrderService;

/// Deliveries tried per callback before giving up (~1 h of backoff in all).
const MAX_CALLBACK_ATTEMPTS: u32 = 12;
/// Callbacks in flight at once.
const MAX_IN_FLIGHT: usize = 32;
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the retention sweep runs.
const RETENTION_SWEEP: Duration = Duration::from_secs(10);

/// The secret a task's callback is signed with: its tenant's own (see
/// [`ferry_core::id::tenant_callback_secret`]), or the operator's for the operator's
/// functions.
fn callback_secret_of(operator: &str, function: &str) -> String {
    match keys::owner_of(function) {
        keys::OPERATOR_OWNER => operator.to_string(),
        tenant => ferry_core::id::tenant_callback_secret(operator, tenant),
    }
}

/// `t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: the receiver recomputes
/// it with the shared secret and may refuse old timestamps (replays).
pub fn signature(secret: &[u8], t_ms: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(t_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t_ms},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Backoff before delivery attempt `n + 1`: 1 s, 2 s, 4 s … capped at 10 min, ±20%.
fn backoff_ms(attempts: u32, jitter: f64) -> u64 {
    let base = 1000u64.saturating_mul(1 << attempts.min(20)).min(600_000);
    (base as f64 * (0.8 + 0.4 * jitter.clamp(0.0, 1.0))) as u64
}

/// The callback request for a finished task: (body, extra headers).
fn request(task: &TaskRecord) -> (Vec<u8>, Vec<(&'static str, String)>) {
    let output = task.output.clone().unwrap_or_default();
    match task.callback_style {
        CallbackStyle::Openfaas => {
            let status = if task.state == ferry_core::task::TaskState::Succeeded {
                "200"
            } else {
                "500"
            };
            let body = if task.state == ferry_core::task::TaskState::Succeeded {
                output
            } else {
                task.error.clone().unwrap_or_default().into_bytes()
            };
            (
                body,
                vec![
                    ("x-function-status", status.to_string()),
                    ("x-call-id", task.id.clone()),
                ],
            )
        }
        CallbackStyle::Ferry => {
            let mut v = json!({
                "task_id": task.id,
                // A tenant's function is stored as `{tenant}.{name}` (names have no
                // dots): the receiver gets the name it knows.
                "function": task.version.name.rsplit('.').next().unwrap_or_default(),
                "version": task.version.version,
                "state": task.state.as_str(),
                "attempts": task.attempt,
                "finished_ms": task.updated_ms,
            });
            match serde_json::from_slice::<serde_json::Value>(&output) {
                Ok(j) if task.output.is_some() => v["output"] = j,
                _ if task.output.is_some() => {
                    use base64::Engine;
                    v["output_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&output));
                }
                _ => {}
            }
            if let Some(e) = &task.error {
                v["error"] = json!(e);
            }
            if let Some(c) = &task.error_code {
                v["error_code"] = json!(c);
            }
            (
                serde_json::to_vec(&v).unwrap_or_default(),
                vec![("content-type", "application/json".to_string())],
            )
        }
    }
}

impl OrderService {
    /// Whether this instance holds the cluster-wide duties now.
    fn on_duty(&self) -> bool {
        if self.incarnation() == 0 {
            return false;
        }
        let me = &self.inner.cfg.id;
        self.inner
            .instances
            .snapshot()
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next())
            .min()
            .is_some_and(|first| first == me)
    }

    /// Deletes finished tasks (and their index keys) past the retention, by the
    /// finish-time index.
    pub(crate) async fn retention_loop(self) {
        let cluster = self.inner.cfg.cluster.clone();
        loop {
            tokio::time::sleep(RETENTION_SWEEP.min(self.inner.cfg.task_retention)).await;
            if !self.on_duty() {
                continue;
            }
            let cutoff = ferry_core::now_ms()
                .saturating_sub(self.inner.cfg.task_retention.as_millis() as u64);
            match self.remove_expired(&cluster, cutoff).await {
                Ok(0) => {}
                Ok(n) => info!(removed = n, "finished tasks past their retention removed"),
                Err(e) => warn!(error = %e, "retention sweep failed; retrying later"),
            }
        }
    }

    /// Removes the tasks of `cluster` that finished in whole seconds before `cutoff`
    /// (ms), with their finish-time, listing-index and callback keys: a page of the
    /// finish-time index at a time, so a sweep never reads what is not expired.
    async fn remove_expired(&self, cluster: &str, cutoff: u64) -> Result<usize, StoreError> {
        let prefix = keys::done_of(cluster);
        // Keys of seconds that ended at or before the cutoff sort before this bound.
        let end = keys::done(cluster, (cutoff / 1000) * 1000, "");
        if end <= prefix {
            return Ok(0);
        }
        let mut q = RangeQuery {
            start: prefix.clone(),
            end,
            limit: 500,
        };
        let mut removed = 0;
        loop {
            let page = self.inner.store.range_page(&q).await?;
            // Finish-time keys from before the listing index hold no value: the
            // task's record says where its index keys are.
            let unknown: Vec<String> = page
                .kvs
                .iter()
                .flat_map(|kv| keys::done_tasks(&kv.key, &kv.value))
                .filter(|(_, listed)| listed.is_none())
                .map(|(id, _)| keys::task(id))
                .collect();
            let mut records = std::collections::HashMap::new();
            for chunk in unknown.chunks(100) {
                let txn = Txn {
                    success: chunk.iter().map(|k| Op::get(k.clone())).collect(),
                    ..Txn::default()
                };
                for kv in self.inner.store.txn(txn).await?.gets.into_iter().flatten() {
                    if let Ok(t) = serde_json::from_slice::<TaskRecord>(&kv.value) {
                        records.insert(t.id.clone(), (t.created_ms, t.function));
                    }
                }
            }
            // Each task's keys, then the finish-time key, in transactions of at most
            // ~100 deletes (a key split over two is finished by the second; deletes
            // are idempotent, so a sweep cut short is finished by the next).
            let mut txn = Txn::new();
            for kv in &page.kvs {
                for (id, listed) in keys::done_tasks(&kv.key, &kv.value) {
                    txn = txn
                        .then(Op::delete(keys::task(id)))
                        .then(Op::delete(keys::callback(cluster, id)));
                    let listed = match listed {
                        Some((ms, f)) => Some((ms, f.to_string())),
                        None => records.get(id).cloned(),
                    };
                    if let Some((created_ms, function)) = listed {
                        for k in keys::task_index(&function, created_ms, id) {
                            txn = txn.then(Op::delete(k));
                        }
                    }
                    removed += 1;
                    if txn.success.len() >= 100 {
                        self.inner.store.txn(std::mem::take(&mut txn)).await?;
                    }
                }
                txn = txn.then(Op::delete(kv.key.clone()));
            }
            if !txn.success.is_empty() {
                self.inner.store.txn(txn).await?;
            }
            match page.kvs.last() {
                Some(last) if page.more => q = q.after(&last.key),
                _ => return Ok(removed),
            }
        }
    }

    /// Delivers pending callbacks when they are due.
    pub(crate) async fn callback_loop(self) {
        let http = reqwest::Client::builder()
            .timeout(CALLBACK_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        if self.inner.cfg.callback_secret.is_none() {
            warn!("no callback secret configured: task callbacks are sent unsigned");
        }
        let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut changes = self.inner.callbacks.changes();
        loop {
            let now = ferry_core::now_ms();
            let mut next_due = now + 1000;
            if self.on_duty() {
                for kv in self.inner.callbacks.snapshot() {
                    let Ok(cb) = serde_json::from_slice::<CallbackRecord>(&kv.value) else {
                        continue;
                    };
                    if cb.next_ms > now {
                        next_due = next_due.min(cb.next_ms);
                        continue;
                    }
                    {
                        let mut f = in_flight.lock().unwrap_or_else(|p| p.into_inner());
                        if f.len() >= MAX_IN_FLIGHT || !f.insert(cb.task_id.clone()) {
                            continue;
                        }
                    }
                    let svc = self.clone();
                    let http = http.clone();
                    let in_flight = in_flight.clone();
                    tokio::spawn(async move {
                        let id = cb.task_id.clone();
                        let rev = svc.deliver(&http, cb, kv.key, kv.mod_revision).await;
                        // Until our own write shows in the cache, the old record would
                        // look due again: wait for it before letting the key go.
                        if let Some(rev) = rev {
                            svc.inner
                                .callbacks
                                .wait_for(rev, Duration::from_secs(5))
                                .await;
                        }
                        in_flight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        svc.inner.callback_done.notify_one();
                    });
                }
            }
            let wait = Duration::from_millis(next_due.saturating_sub(now).max(20));
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = self.inner.callback_done.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One delivery attempt; the outcome is written back with a compare on the
    /// callback key's revision (a concurrent holder's write wins, ours is dropped).
    /// Returns the store revision of that write.
    async fn deliver(
        &self,
        http: &reqwest::Client,
        cb: CallbackRecord,
        key: String,
        rev: i64,
    ) -> Option<i64> {
        let Ok(Some(tkv)) = self.inner.store.get(&keys::task(&cb.task_id)).await else {
            let _ = self
                .inner
                .store
                .txn(
                    Txn::new()
                        .when(Compare::mod_revision(&key, rev))
                        .then(Op::delete(&key)),
                )
                .await;
            return None;
        };
        let Ok(mut task) = serde_json::from_slice::<TaskRecord>(&tkv.value) else {
            return None;
        };
        let url = task.callback_url.clone()?;
        let (body, headers) = request(&task);
        let mut req = http
            .post(&url)
            .header("x-ferry-task-id", &task.id)
            .header("x-ferry-event", "task.finished");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(operator) = &self.inner.cfg.callback_secret {
            let secret = callback_secret_of(operator, &task.function);
            let t = ferry_core::now_ms();
            req = req.header("x-ferry-signature", signature(secret.as_bytes(), t, &body));
        }
        let result = match req.body(body).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the receiver answered {}", r.status())),
            Err(e) => Err(format!("could not reach the receiver: {}", root_cause(&e))),
        };
        let attempts = cb.attempts + 1;
        let now = ferry_core::now_ms();
        let give_up = result.is_err() && attempts >= MAX_CALLBACK_ATTEMPTS;
        let mut txn = Txn::new().when(Compare::mod_revision(&key, rev));
        if result.is_ok() || give_up {
            task.callback = Some(CallbackStatus {
                delivered: result.is_ok(),
                attempts,
                at_ms: now,
                last_error: result.as_ref().err().cloned(),
            });
            txn = txn
                .when(Compare::mod_revision(
                    keys::task(&task.id),
                    tkv.mod_revision,
                ))
                .then(Op::delete(&key))
                .then(Op::put(
                    keys::task(&task.id),
                    serde_json::to_vec(&task).unwrap_or_default(),
                ));
            match &result {
                Ok(()) => debug!(task_id = %task.id, attempts, "callback delivered"),
                Err(e) => warn!(task_id = %task.id, attempts, error = %e, "callback given up"),
            }
        } else {
            let next = CallbackRecord {
                attempts,
                next_ms: now + backoff_ms(cb.attempts, rand::rng().random()),
                last_error: result.as_ref().err().cloned(),
                ..cb
            };
            debug!(task_id = %task.id, attempts, error = ?next.last_error, "callback failed; will retry");
            txn = txn.then(Op::put(&key, serde_json::to_vec(&next).unwrap_or_default()));
        }
        match self.inner.store.txn(txn).await {
            Ok(r) if r.succeeded => Some(r.revision),
            Ok(_) => None,
            Err(e) => {
                warn!(task_id = %task.id, error = %e, "could not record callback delivery");
                None
            }
        }
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_callbacks_are_signed_with_their_own_secret() {
        assert_eq!(callback_secret_of("op", "resize"), "op");
        let acme = callback_secret_of("op", "acme.resize");
        assert_eq!(acme, ferry_core::id::tenant_callback_secret("op", "acme"));
        assert_ne!(acme, callback_secret_of("op", "bravo.resize"));
    }

    #[test]
    fn the_signature_is_an_hmac_of_time_and_body() {
        // What a receiver computes: HMAC-SHA256 of "<t>.<body>" with the shared secret.
        let sig = signature(b"secret", 1_700_000_000_000, b"{\"a\":1}");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(b"1700000000000.{\"a\":1}");
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(sig, format!("t=1700000000000,v1={want}"));
        assert_ne!(sig, signature(b"other", 1_700_000_000_000, b"{\"a\":1}"));
        assert_ne!(sig, signature(b"secret", 1_700_000_000_001, b"{\"a\":1}"));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ms(0, 0.5), 1000);
        assert_eq!(backoff_ms(3, 0.5), 8000);
        assert_eq!(backoff_ms(30, 0.5), 600_000);
        assert!(backoff_ms(2, 0.0) >= 3200 && backoff_ms(2, 1.0) <= 4800);
    }
}

#[cfg(test)]
mod retention {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Config;
    use crate::tasks::fencing::service;

    #[tokio::test]
    async fn expired_tasks_go_with_their_index_keys_and_nothing_newer_does() {
        let cfg = Config {
            token: "t".into(),
            ..Config::default()
        };
        let (_dir, store, svc) = service(cfg.clone()).await;
        let cluster = cfg.cluster.clone();
        // Finished at 10 s and 20 s (the first written before finish-time keys held
        // their task's index), and one at 30 s past the cutoff of 25 s.
        let mut all = vec![];
        for (finished, with_value) in [(10_000, false), (20_000, true), (30_000, true)] {
            let t = crate::tasks::fencing::queued_task("acme.resize", finished - 5_000);
            let mut txn =
                Txn::new().then(Op::put(keys::task(&t.id), serde_json::to_vec(&t).unwrap()));
            for k in keys::task_index(&t.function, t.created_ms, &t.id) {
                txn = txn.then(Op::put(k, t.function.clone()));
            }
            let value = if with_value {
                keys::done_value(t.created_ms, &t.function)
            } else {
                vec![]
            };
            txn = txn.then(Op::put(keys::done(&cluster, finished, &t.id), value));
            store.txn(txn).await.unwrap();
            all.push(t);
        }
        // Three finished at 15 s, committed together: one finish-time key lists them.
        let mut group = vec![];
        let mut txn = Txn::new();
        for _ in 0..3 {
            let t = crate::tasks::fencing::queued_task("acme.resize", 12_000);
            txn = txn
                .then(Op::put(keys::task(&t.id), serde_json::to_vec(&t).unwrap()))
                .then(Op::put(keys::callback(&cluster, &t.id), b"{}".to_vec()));
            for k in keys::task_index(&t.function, t.created_ms, &t.id) {
                txn = txn.then(Op::put(k, t.function.clone()));
            }
            group.push(t);
        }
        let listed = keys::done_group_value(
            group
                .iter()
                .map(|t| (t.id.as_str(), t.created_ms, t.function.as_str())),
        );
        txn = txn.then(Op::put(keys::done(&cluster, 15_000, &group[0].id), listed));
        store.txn(txn).await.unwrap();
        let removed = svc.remove_expired(&cluster, 25_000).await.unwrap();
        assert_eq!(removed, 5);
        for t in all[..2].iter().chain(&group) {
            assert!(store.get(&keys::task(&t.id)).await.unwrap().is_none());
        }
        assert!(
            store
                .range(&keys::callbacks_of(&cluster))
                .await
                .unwrap()
                .kvs
                .is_empty()
        );
        let kept = &all[2];
        assert!(store.get(&keys::task(&kept.id)).await.unwrap().is_some());
        let left: Vec<String> = store
            .range(keys::TASK_INDEX)
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(
            left,
            keys::task_index(&kept.function, kept.created_ms, &kept.id).to_vec()
        );
        assert_eq!(store.range(keys::DONE).await.unwrap().kvs.len(), 1);
        // Nothing more to remove.
        assert_eq!(svc.remove_expired(&cluster, 25_000).await.unwrap(), 0);
        svc.close().await;
    }
}
