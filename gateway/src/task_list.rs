//! Task listings from the listing indexes (`keys::TASK_INDEX`), a page at a time: the
//! cost of a listing is the page it returns (plus what a state filter skips, up to a
//! scan budget), not the number of tasks in the store.
//!
//! - `GET /v1/tasks?function=…`: the function's index; without a function, the
//!   tenant's (owner) index; for the admin, every owner's index merged.
//! - Newest first. A page that stopped early says where the next one starts (`next`,
//!   an opaque cursor: the position of the last task it looked at).
//! - Re-runs select from the same indexes, oldest first within their time window.
//! - Tasks written before the indexes existed are indexed once, at gateway start.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use ferry_core::task::{TaskRecord, TaskState};
use ferry_core::{ErrorCode, keys};
use ferry_store::{Compare, Op, RangeQuery, Store, Txn};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::tenancy::Principal;

type Who = axum::Extension<Principal>;

/// Index entries read per store round trip.
const PAGE: usize = 200;
/// Index entries one listing request looks at, at most, when a filter skips tasks.
const SCAN_BUDGET: usize = 5_000;

/// The index keys a new task is written with (in its submission transaction).
pub fn index_puts(t: &TaskRecord) -> [Op; 2] {
    let [by_function, by_owner] = keys::task_index(&t.function, t.created_ms, &t.id);
    [
        Op::put(by_function, t.function.as_bytes().to_vec()),
        Op::put(by_owner, t.function.as_bytes().to_vec()),
    ]
}

/// One index prefix, read page by page in position order.
struct Source {
    prefix: String,
    query: RangeQuery,
    buf: VecDeque<(String, String)>,
    more: bool,
}

impl Source {
    fn new(prefix: String, since: Option<u64>, until: Option<u64>, after: Option<&str>) -> Self {
        let end = match since {
            Some(ms) => format!("{prefix}{}", keys::position_bound(ms)),
            None => ferry_store::prefix_end(&prefix),
        };
        let mut start = match until {
            Some(ms) => format!("{prefix}{}", keys::position_bound(ms)),
            None => prefix.clone(),
        };
        if let Some(a) = after {
            let resume = format!("{prefix}{a}\u{0}");
            if resume > start {
                start = resume;
            }
        }
        Self {
            query: RangeQuery {
                start,
                end,
                limit: PAGE,
            },
            prefix,
            buf: VecDeque::new(),
            more: true,
        }
    }

    /// The next entry's (position, function) without taking it.
    async fn peek(&mut self, store: &Arc<dyn Store>) -> ApiResult<Option<&(String, String)>> {
        if self.buf.is_empty() && self.more {
            if self.query.start >= self.query.end {
                self.more = false;
                return Ok(None);
            }
            let page = store.range_page(&self.query).await?;
            self.more = page.more;
            if let Some(last) = page.kvs.last() {
                self.query = self.query.after(&last.key);
            }
            for kv in page.kvs {
                if let Some(pos) = kv.key.strip_prefix(&self.prefix) {
                    let function = String::from_utf8_lossy(&kv.value).into_owned();
                    self.buf.push_back((pos.to_string(), function));
                }
            }
        }
        Ok(self.buf.front())
    }
}

/// Entries of several index prefixes merged in position order (newest first).
struct Merged {
    sources: Vec<Source>,
}

impl Merged {
    /// The next (position, function), if any is left.
    async fn next(&mut self, store: &Arc<dyn Store>) -> ApiResult<Option<(String, String)>> {
        let mut best: Option<usize> = None;
        let mut best_pos: Option<String> = None;
        for (i, s) in self.sources.iter_mut().enumerate() {
            if let Some((pos, _)) = s.peek(store).await?
                && best_pos.as_ref().is_none_or(|b| pos < b)
            {
                best_pos = Some(pos.clone());
                best = Some(i);
            }
        }
        Ok(best.and_then(|i| self.sources[i].buf.pop_front()))
    }

    async fn is_empty(&mut self, store: &Arc<dyn Store>) -> ApiResult<bool> {
        for s in &mut self.sources {
            if s.peek(store).await?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Reads the task records of `ids` in one round trip per 100 (absent ones: None), and
/// lays the claims of queued ones' entries over them (a claimed task is running) with
/// one more round trip, which holds only while those records are unchanged (else the
/// chunk is read again), so a record and its entry are seen at one revision.
async fn records(store: &Arc<dyn Store>, ids: &[String]) -> ApiResult<Vec<Option<TaskRecord>>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(100) {
        out.extend(records_at_one_revision(store, chunk).await?);
    }
    Ok(out)
}

async fn records_at_one_revision(
    store: &Arc<dyn Store>,
    ids: &[String],
) -> ApiResult<Vec<Option<TaskRecord>>> {
    const TRIES: usize = 4;
    let mut attempt = 1;
    loop {
        let txn = Txn {
            success: ids.iter().map(|id| Op::get(keys::task(id))).collect(),
            ..Txn::default()
        };
        let mut recs: Vec<Option<(TaskRecord, i64)>> = store
            .txn(txn)
            .await?
            .gets
            .into_iter()
            .map(|got| {
                got.and_then(|kv| {
                    serde_json::from_slice::<TaskRecord>(&kv.value)
                        .ok()
                        .map(|t| (t, kv.mod_revision))
                })
            })
            .collect();
        let queued: Vec<usize> = (0..recs.len())
            .filter(|&i| {
                recs[i]
                    .as_ref()
                    .is_some_and(|(t, _)| t.state == TaskState::Queued)
            })
            .collect();
        if !queued.is_empty() {
            let mut txn = Txn::new();
            for (t, rev) in queued.iter().filter_map(|&i| recs[i].as_ref()) {
                // The last try reads the entries whatever happened to the records.
                if attempt < TRIES {
                    txn = txn.when(Compare::mod_revision(keys::task(&t.id), *rev));
                }
                txn = txn.then(Op::get(keys::queued(&t.cluster, &t.id)));
            }
            let read = store.txn(txn).await?;
            if !read.succeeded {
                attempt += 1;
                continue;
            }
            for (&i, entry) in queued.iter().zip(read.gets) {
                if let Some((t, rev)) = recs[i].take() {
                    recs[i] = Some((crate::tasks::with_entry(t, entry.as_ref()), rev));
                }
            }
        }
        return Ok(recs.into_iter().map(|r| r.map(|(t, _)| t)).collect());
    }
}

fn task_id_of(position: &str) -> &str {
    position.split_once('/').map_or("", |(_, id)| id)
}

/// The index prefixes a listing by `who` reads (one per owner for the admin without a
/// function).
async fn prefixes(
    store: &Arc<dyn Store>,
    who: &Principal,
    function: Option<&str>,
) -> ApiResult<Vec<String>> {
    if let Some(f) = function {
        return Ok(vec![keys::tasks_of_function(f)]);
    }
    match who {
        Principal::Tenant(t) => Ok(vec![keys::tasks_of_owner(&t.id)]),
        Principal::Admin => {
            let mut owners = vec![keys::tasks_of_owner(keys::OPERATOR_OWNER)];
            for kv in store.range(keys::TENANTS).await?.kvs {
                if let Some(id) = kv.key.strip_prefix(keys::TENANTS) {
                    owners.push(keys::tasks_of_owner(id));
                }
            }
            Ok(owners)
        }
    }
}

/// A time window's bounds, checked.
fn window(since: Option<u64>, until: Option<u64>) -> ApiResult<()> {
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("since_ms {s} is not before until_ms {u}"),
        ));
    }
    Ok(())
}

fn valid_cursor(c: &str) -> bool {
    let Some((ms, id)) = c.split_once('/') else {
        return false;
    };
    ms.len() == 13
        && ms.bytes().all(|b| b.is_ascii_digit())
        && !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    function: Option<String>,
    state: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    limit: Option<usize>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// `GET /v1/tasks`: newest first, `limit` (default 100, at most 1,000) a page.
pub async fn list(
    State(st): State<Arc<AppState>>,
    who: Who,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = query.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let state =
        match q.state.as_deref() {
            None => None,
            Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
                ApiError::new(ErrorCode::BadRequest, format!("unknown state {s:?}"))
            })?),
        };
    window(q.since_ms, q.until_ms)?;
    if let Some(a) = &q.after
        && !valid_cursor(a)
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("after {a:?} is not a cursor this API returned"),
        ));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let function = q.function.as_deref().map(|f| who.internal(f));
    let sources = prefixes(&st.store, &who, function.as_deref())
        .await?
        .into_iter()
        .map(|p| Source::new(p, q.since_ms, q.until_ms, q.after.as_deref()))
        .collect();
    let mut merged = Merged { sources };
    let mut tasks = vec![];
    let mut scanned = 0;
    let mut last: Option<String> = None;
    // Entries taken from the index but not looked at (the page filled up first).
    let mut left_in_batch = false;
    'pages: while tasks.len() < limit && scanned < SCAN_BUDGET.max(limit) {
        // Take as many entries as could still be returned (all of them when nothing
        // is filtered out), then read their records at once.
        let want = if state.is_some() {
            PAGE
        } else {
            limit - tasks.len()
        };
        let mut batch = vec![];
        while batch.len() < want {
            match merged.next(&st.store).await? {
                Some(entry) => batch.push(entry),
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let ids: Vec<String> = batch
            .iter()
            .map(|(p, _)| task_id_of(p).to_string())
            .collect();
        let recs = records(&st.store, &ids).await?;
        let n = batch.len();
        for (i, ((pos, _), rec)) in batch.into_iter().zip(recs).enumerate() {
            scanned += 1;
            last = Some(pos);
            if let Some(t) = rec
                && who.owns(&t.function)
                && state.is_none_or(|s| t.state == s)
            {
                tasks.push(crate::tasks::view(&who, &t));
                if tasks.len() == limit {
                    left_in_batch = i + 1 < n;
                    break 'pages;
                }
            }
        }
    }
    // Where the next page starts, when one may have something.
    let next = match last {
        Some(pos) if left_in_batch || !merged.is_empty(&st.store).await? => Some(pos),
        _ => None,
    };
    Ok(Json(json!({ "tasks": tasks, "next": next })))
}

/// Tasks of `function` created in `[since, until)` that `keep` accepts, oldest first,
/// at most `limit` (the oldest ones). Reads the window's index entries and their task
/// records, a page at a time, holding at most `limit` records.
pub async fn select_oldest(
    store: &Arc<dyn Store>,
    function: &str,
    since: Option<u64>,
    until: Option<u64>,
    limit: usize,
    keep: impl Fn(&TaskRecord) -> bool,
) -> ApiResult<Vec<TaskRecord>> {
    window(since, until)?;
    let mut src = Merged {
        sources: vec![Source::new(
            keys::tasks_of_function(function),
            since,
            until,
            None,
        )],
    };
    // Newest to oldest: the last `limit` kept are the oldest.
    let mut kept: VecDeque<TaskRecord> = VecDeque::new();
    loop {
        let mut ids = vec![];
        while ids.len() < PAGE {
            match src.next(store).await? {
                Some((pos, _)) => ids.push(task_id_of(&pos).to_string()),
                None => break,
            }
        }
        if ids.is_empty() {
            break;
        }
        for t in records(store, &ids).await?.into_iter().flatten() {
            if t.function == function && keep(&t) {
                kept.push_back(t);
                if kept.len() > limit {
                    kept.pop_front();
                }
            }
        }
    }
    Ok(kept.into_iter().rev().collect())
}

/// Indexes tasks written before the listing index (once per store: a marker key says
/// it is done). Idempotent, so gateways starting together may both run it.
pub async fn backfill(store: &Arc<dyn Store>) -> Result<usize, ferry_store::StoreError> {
    if store.get(keys::TASK_INDEX_READY).await?.is_some() {
        return Ok(0);
    }
    let mut q = RangeQuery::prefix(keys::TASKS, 500);
    let mut indexed = 0;
    loop {
        let page = store.range_page(&q).await?;
        let mut txn = Txn::new();
        for kv in &page.kvs {
            if let Ok(t) = serde_json::from_slice::<TaskRecord>(&kv.value) {
                for op in index_puts(&t) {
                    txn = txn.then(op);
                }
                indexed += 1;
                if txn.success.len() >= 100 {
                    store.txn(std::mem::take(&mut txn)).await?;
                }
            }
        }
        if !txn.success.is_empty() {
            store.txn(txn).await?;
        }
        match page.kvs.last() {
            Some(last) if page.more => q = q.after(&last.key),
            _ => break,
        }
    }
    store
        .put(keys::TASK_INDEX_READY, b"1".to_vec(), ferry_store::NO_LEASE)
        .await?;
    Ok(indexed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_positions() {
        let pos = keys::task_position(1_700_000_000_000, "01ABC");
        assert!(valid_cursor(&pos));
        assert_eq!(task_id_of(&pos), "01ABC");
        for bad in [
            "",
            "123/abc",
            "12345678901234/x",
            "1234567890123/",
            "1234567890123/a/b",
        ] {
            assert!(!valid_cursor(bad), "{bad}");
        }
    }
}
