//! Queues (`/v1/queues`): the limits that a tenant's or business line's async tasks
//! share. A submission names a queue (`X-Ferry-Queue` or `?queue=`; else `default`);
//! the gateway holds it to the queue's QPS and gives it the queue's priority class when
//! it asks for none, and order-servers hold the queue to its MRT when they claim. So a
//! tenant's flood fills its own queue and waits there, never in another tenant's.
//!
//! Names are scoped like functions: a tenant's `uploads` is stored as `{tenant}.uploads`
//! and the admin token addresses it by that name. Only the admin token sets or deletes
//! queues (they are quotas); tenants read their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_core::model::{DEFAULT_QUEUE, QueueRecord, RERUN_QUEUE};
use ferry_core::task::{Priority, QueueEntry};
use ferry_core::{ErrorCode, keys};
use ferry_store::{Compare, Op, Store, StoreError, Txn, WatchCache};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::api::{parse_json, read_body};
use crate::error::{ApiError, ApiResult};
use crate::tenancy::Principal;

type St = State<Arc<AppState>>;
type Who = axum::Extension<Principal>;

/// Every queue record, kept current by a watch: submissions read no store.
pub struct Queues {
    cache: WatchCache,
}

impl Queues {
    pub async fn start(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        Ok(Self {
            cache: WatchCache::start(store, keys::QUEUES).await?,
        })
    }

    fn record(&self, internal: &str) -> Option<QueueRecord> {
        self.cache
            .get(&keys::queue_def(internal))
            .and_then(|kv| serde_json::from_slice(&kv.value).ok())
    }

    /// The queue a submission of `who` goes to: the one it names, or `default`. A queue
    /// without a record exists only as `default` or `reruns`; any other unknown name is
    /// a 404 (and a tenant can only name its own).
    pub fn resolve(&self, who: &Principal, name: Option<&str>) -> ApiResult<QueueRecord> {
        let name = name.unwrap_or(DEFAULT_QUEUE);
        if !ferry_core::id::valid_name(name) {
            return Err(not_found(name));
        }
        let internal = who.internal(name);
        match self.record(&internal) {
            Some(q) => Ok(q),
            None if name == DEFAULT_QUEUE || name == RERUN_QUEUE => {
                Ok(QueueRecord::implicit(&internal))
            }
            None => Err(not_found(name)),
        }
    }

    fn all(&self) -> Vec<QueueRecord> {
        self.cache
            .snapshot()
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect()
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no queue named {name:?}; an operator creates queues with `ferry queue set`"),
    )
}

/// The body of `PUT /v1/queues/{name}`: the whole queue (absent limits are unlimited).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueSpec {
    #[serde(default)]
    qps: Option<f64>,
    #[serde(default)]
    burst: Option<u32>,
    #[serde(default)]
    mrt: Option<u32>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, msg)
}

/// Checks a spec and makes the record for `internal` (owned by `tenant`).
fn record_of(internal: &str, tenant: Option<String>, s: QueueSpec) -> ApiResult<QueueRecord> {
    if let Some(q) = s.qps
        && !(q.is_finite() && q > 0.0 && q <= 1e9)
    {
        return Err(bad(format!(
            "qps {q}: expected a number above 0 (leave it out for no limit)"
        )));
    }
    if s.burst == Some(0) {
        return Err(bad("burst 0: expected at least 1"));
    }
    if s.burst.is_some() && s.qps.is_none() {
        return Err(bad("burst needs qps"));
    }
    let priority = match s.priority.as_deref() {
        // A `reruns` queue stays batch class unless told otherwise.
        None => QueueRecord::implicit(internal).priority,
        Some(p) => Priority::parse(p).ok_or_else(|| {
            bad(format!(
                "priority {p:?}: expected critical, normal or batch"
            ))
        })?,
    };
    if s.description.as_ref().is_some_and(|d| d.len() > 256) {
        return Err(bad("description: at most 256 bytes"));
    }
    Ok(QueueRecord {
        name: internal.to_string(),
        tenant,
        description: s.description,
        qps: s.qps,
        burst: s.burst,
        mrt: s.mrt,
        priority,
        updated_ms: ferry_core::now_ms(),
    })
}

/// Splits an admin-given name into (tenant, internal name); checks both parts.
fn admin_name(name: &str) -> ApiResult<(Option<String>, String)> {
    let (tenant, short) = match name.split_once('.') {
        Some((t, n)) => (Some(t), n),
        None => (None, name),
    };
    if !ferry_core::id::valid_name(short) || tenant.is_some_and(|t| !ferry_core::id::valid_name(t))
    {
        return Err(bad(format!(
            "queue name {name:?}: expected NAME or TENANT.NAME (lowercase letters, digits and -)"
        )));
    }
    Ok((tenant.map(str::to_string), name.to_string()))
}

/// Queued and running tasks per queue (internal name) and class, read from the store:
/// queue entries carry their queue and class, and a claim mark while the task runs.
pub(crate) async fn counts(store: &dyn Store) -> Result<BTreeMap<String, QueueCounts>, StoreError> {
    let mut out: BTreeMap<String, QueueCounts> = BTreeMap::new();
    for kv in store.range(keys::QUEUE).await?.kvs {
        if let Ok(e) = serde_json::from_slice::<QueueEntry>(&kv.value) {
            let c = out.entry(e.queue).or_default();
            if e.claim.is_some() {
                c.running[e.priority as usize] += 1;
            } else {
                c.queued[e.priority as usize] += 1;
            }
        }
    }
    Ok(out)
}

/// Tasks of one queue by class (critical, normal, batch): queued and running.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QueueCounts {
    pub queued: [u64; 3],
    pub running: [u64; 3],
}

fn view(who: &Principal, q: &QueueRecord, c: QueueCounts, configured: bool) -> serde_json::Value {
    let mut v = json!({
        "name": who.external(&q.name),
        "priority": q.priority,
        "qps": q.qps,
        "burst": q.burst,
        "mrt": q.mrt,
        "queued": c.queued.iter().sum::<u64>(),
        "queued_by_priority": {
            "critical": c.queued[0], "normal": c.queued[1], "batch": c.queued[2],
        },
        "running": c.running.iter().sum::<u64>(),
        "configured": configured,
        "updated_ms": q.updated_ms,
    });
    if let Some(d) = &q.description {
        v["description"] = json!(d);
    }
    if who.is_admin() {
        v["tenant"] = json!(q.tenant);
    }
    v
}

/// The queues `who` may see: its records, and its implicit `default` and `reruns`
/// when they have none.
fn visible(st: &AppState, who: &Principal) -> Vec<(QueueRecord, bool)> {
    let mut out: Vec<(QueueRecord, bool)> = st
        .queues
        .all()
        .into_iter()
        .filter(|q| match who {
            Principal::Admin => true,
            Principal::Tenant(t) => q.tenant.as_deref() == Some(t.id.as_str()),
        })
        .map(|q| (q, true))
        .collect();
    for name in [DEFAULT_QUEUE, RERUN_QUEUE] {
        let internal = who.internal(name);
        if !out.iter().any(|(q, _)| q.name == internal) {
            out.push((QueueRecord::implicit(&internal), false));
        }
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    out
}

/// `GET /v1/queues`.
pub async fn list(State(st): St, who: Who) -> ApiResult<Json<serde_json::Value>> {
    let counts = counts(st.store.as_ref()).await?;
    let list: Vec<_> = visible(&st, &who)
        .iter()
        .map(|(q, configured)| {
            let c = counts.get(&q.name).copied().unwrap_or_default();
            view(&who, q, c, *configured)
        })
        .collect();
    Ok(Json(json!({ "queues": list })))
}

/// `GET /v1/queues/{name}`.
pub async fn get(
    State(st): St,
    who: Who,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let internal = who.internal(&name);
    let (q, configured) = visible(&st, &who)
        .into_iter()
        .find(|(q, _)| q.name == internal)
        .ok_or_else(|| not_found(&name))?;
    let c = counts(st.store.as_ref())
        .await?
        .get(&q.name)
        .copied()
        .unwrap_or_default();
    Ok(Json(view(&who, &q, c, configured)))
}

/// `PUT /v1/queues/{name}` (admin): creates or replaces a queue.
pub async fn set(
    State(st): St,
    who: Who,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    who.require_admin()?;
    let (tenant, internal) = admin_name(&name)?;
    let bytes = read_body(&headers, body, 16 << 10).await?;
    let spec: QueueSpec = parse_json(&bytes)?;
    let rec = record_of(&internal, tenant.clone(), spec)?;
    if let Some(t) = &tenant
        && st.store.get(&keys::tenant(t)).await?.is_none()
    {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no tenant {t:?}"),
        ));
    }
    let key = keys::queue_def(&internal);
    let created = st.store.get(&key).await?.is_none();
    let rev = st
        .store
        .txn(Txn::new().then(Op::put(&key, serde_json::to_vec(&rec).unwrap_or_default())))
        .await?
        .revision;
    st.queues
        .cache
        .wait_for(rev, std::time::Duration::from_secs(3))
        .await;
    tracing::info!(queue = %internal, mrt = ?rec.mrt, qps = ?rec.qps, "queue set");
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(view(&who, &rec, QueueCounts::default(), true))).into_response())
}

/// `DELETE /v1/queues/{name}` (admin): its tasks stay, under the implicit defaults.
pub async fn delete(
    State(st): St,
    who: Who,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    let (_, internal) = admin_name(&name)?;
    let key = keys::queue_def(&internal);
    let r = st
        .store
        .txn(
            Txn::new()
                .when(Compare::exists(&key))
                .then(Op::delete(&key)),
        )
        .await?;
    if !r.succeeded {
        return Err(not_found(&name));
    }
    let rev = r.revision;
    st.queues
        .cache
        .wait_for(rev, std::time::Duration::from_secs(3))
        .await;
    tracing::info!(queue = %internal, "queue deleted");
    Ok(Json(json!({ "deleted": name })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked() {
        let ok = QueueSpec {
            qps: Some(5.0),
            burst: Some(10),
            mrt: Some(2),
            priority: Some("batch".into()),
            description: None,
        };
        let r = record_of("acme.uploads", Some("acme".into()), ok).unwrap();
        assert_eq!((r.mrt, r.priority), (Some(2), Priority::Batch));
        for bad_spec in [
            QueueSpec {
                qps: Some(0.0),
                ..Default::default()
            },
            QueueSpec {
                qps: Some(f64::NAN),
                ..Default::default()
            },
            QueueSpec {
                burst: Some(3),
                ..Default::default()
            },
            QueueSpec {
                priority: Some("urgent".into()),
                ..Default::default()
            },
            QueueSpec {
                description: Some("x".repeat(300)),
                ..Default::default()
            },
        ] {
            assert!(record_of("q", None, bad_spec).is_err());
        }
    }

    #[test]
    fn admin_names_split_into_tenant_and_queue() {
        assert_eq!(
            admin_name("acme.uploads").unwrap(),
            (Some("acme".into()), "acme.uploads".into())
        );
        assert_eq!(admin_name("ops").unwrap(), (None, "ops".into()));
        assert!(admin_name("a.b.c").is_err());
        assert!(admin_name("../x").is_err());
        assert!(admin_name("").is_err());
    }
}
