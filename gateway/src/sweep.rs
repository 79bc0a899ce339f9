//! Forgetting what is past its window: idempotency entries older than the idempotency
//! window (and no longer running), and batch re-run records older than the re-run
//! retention. Every gateway sweeps; each delete is a compare-and-delete on the revision
//! it read, so replicas sweeping together, or a key reused meanwhile, lose nothing.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::keys;
use ferry_store::{Compare, KeyValue, Op, RangeQuery, Store, StoreError, Txn};
use serde::Deserialize;

/// The fields every idempotency entry (sync or async) and re-run record has.
#[derive(Deserialize)]
struct Dated {
    created_ms: u64,
    /// Sync entries: running until then, unless they hold their answer.
    #[serde(default)]
    deadline_ms: u64,
    #[serde(default)]
    result: Option<serde::de::IgnoredAny>,
}

/// The keys under `prefix` whose record was created before `cutoff_ms` (and whose
/// deadline, if any, has passed by `now_ms`).
fn expired(kvs: &[KeyValue], cutoff_ms: u64, now_ms: u64) -> Vec<(String, i64)> {
    kvs.iter()
        .filter_map(|kv| {
            let d: Dated = serde_json::from_slice(&kv.value).ok()?;
            let running = d.result.is_none() && d.deadline_ms > now_ms;
            (d.created_ms < cutoff_ms && !running).then(|| (kv.key.clone(), kv.mod_revision))
        })
        .collect()
}

/// One pass over `prefix`, a page at a time (so a large prefix is never held at
/// once): removes what expired; returns how many.
pub async fn sweep(store: &dyn Store, prefix: &str, keep: Duration) -> Result<usize, StoreError> {
    let now = ferry_core::now_ms();
    let cutoff = now.saturating_sub(keep.as_millis() as u64);
    let mut q = RangeQuery::prefix(prefix, PAGE);
    let mut n = 0;
    loop {
        let page = store.range_page(&q).await?;
        // One at a time: a key reused since the read is kept, and never keeps the others.
        for (key, rev) in expired(&page.kvs, cutoff, now) {
            let r = store
                .txn(
                    Txn::new()
                        .when(Compare::mod_revision(&key, rev))
                        .then(Op::delete(&key)),
                )
                .await?;
            n += usize::from(r.succeeded);
        }
        match page.kvs.last() {
            Some(last) if page.more => q = q.after(&last.key),
            _ => return Ok(n),
        }
    }
}

/// Records read per store round trip.
const PAGE: usize = 500;

/// Sweeps idempotency entries and re-run records every `every` until aborted.
pub async fn run(
    store: Arc<dyn Store>,
    idempotency_window: Duration,
    rerun_retention: Duration,
    every: Duration,
) {
    loop {
        for (prefix, keep) in [
            (keys::IDEMPOTENCY, idempotency_window),
            (keys::RERUNS, rerun_retention),
        ] {
            match sweep(store.as_ref(), prefix, keep).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(prefix, removed = n, "expired records removed"),
                Err(e) => tracing::warn!(prefix, error = %e, "sweeping expired records failed"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 7,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn only_old_entries_that_stopped_running_expire() {
        let kvs = [
            kv("old", r#"{"created_ms": 100, "body_sha256": "x"}"#),
            kv("new", r#"{"created_ms": 5000}"#),
            kv(
                "old-still-running",
                r#"{"created_ms": 100, "deadline_ms": 9000}"#,
            ),
            kv("old-done", r#"{"created_ms": 100, "deadline_ms": 900}"#),
            kv(
                "old-answered",
                r#"{"created_ms": 100, "deadline_ms": 9000, "result": {"status": 200}}"#,
            ),
            kv("garbage", "not json"),
        ];
        let gone: Vec<_> = expired(&kvs, 1000, 2000)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(gone, ["old", "old-done", "old-answered"]);
    }
}
