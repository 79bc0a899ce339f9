//! Tenants, their API keys, and who a request acts for.
//!
//! The gateway's admin token acts for the operator (every function and task, and the
//! admin routes). A tenant key acts for its tenant: the tenant's function `hello` is
//! stored as `{tenant}.hello` (see [`keys::tenant_function`]), and everything outside
//! that prefix answers exactly as if it did not exist (404, never 403). Keys are random
//! 256-bit secrets; only their sha256 is stored, and a presented key is found by hashing
//! it and looking the hash up in memory (rebuilt from store watches, so the hot path
//! reads no store).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ferry_core::model::{ApiKeyRecord, TenantLimits, TenantRecord};
use ferry_core::{Error, ErrorCode, keys};
use ferry_store::{Compare, Op, Revision, Store, StoreError, Txn, WatchCache};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::api::{parse_json, read_body};
use crate::error::{ApiError, ApiResult};

/// Who a request acts for.
#[derive(Clone, Debug)]
pub enum Principal {
    Admin,
    Tenant(Arc<TenantRecord>),
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Admin)
    }

    pub fn tenant(&self) -> Option<&TenantRecord> {
        match self {
            Principal::Admin => None,
            Principal::Tenant(t) => Some(t),
        }
    }

    /// The largest invocation body this caller may send (`gateway_max` at most).
    pub fn max_body(&self, gateway_max: usize) -> usize {
        self.tenant()
            .and_then(|t| t.limits.max_body)
            .map_or(gateway_max, |m| {
                gateway_max.min(usize::try_from(m).unwrap_or(usize::MAX))
            })
    }

    /// The internal name of the function a caller calls `name`.
    pub fn internal(&self, name: &str) -> String {
        match self {
            Principal::Admin => name.to_string(),
            Principal::Tenant(t) => keys::tenant_function(&t.id, name),
        }
    }

    /// Whether the caller may see the function with this internal name.
    pub fn owns(&self, internal: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Tenant(t) => internal
                .strip_prefix(t.id.as_str())
                .is_some_and(|rest| rest.starts_with('.')),
        }
    }

    /// The name the caller knows an internal name by.
    pub fn external<'a>(&self, internal: &'a str) -> &'a str {
        match self {
            Principal::Admin => internal,
            Principal::Tenant(t) => internal
                .strip_prefix(t.id.as_str())
                .and_then(|rest| rest.strip_prefix('.'))
                .unwrap_or(internal),
        }
    }

    /// Admin routes (tenants, keys, nodes, packages) refuse tenant keys.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "this route needs the admin token",
            ))
        }
    }
}

/// The name shown in messages for an internal function name (the tenant prefix left
/// out, so a tenant never reads it, nor another tenant's id).
pub fn shown(internal: &str) -> &str {
    internal.split_once('.').map_or(internal, |(_, n)| n)
}

#[derive(Default)]
struct Snapshot {
    tenants: HashMap<String, Arc<TenantRecord>>,
    /// sha256 of a key → its tenant.
    keys: HashMap<String, String>,
    /// A key's public id → its tenant (SigV4 access key ids name keys by id).
    key_ids: HashMap<String, String>,
}

/// Tenants and key hashes, kept current by watches.
pub struct Directory {
    tenants: WatchCache,
    keys: WatchCache,
    snap: RwLock<Arc<Snapshot>>,
    revision: tokio::sync::watch::Sender<(Revision, Revision)>,
}

impl Directory {
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let tenants = WatchCache::start(store.clone(), keys::TENANTS).await?;
        let keys_cache = WatchCache::start(store, keys::API_KEYS).await?;
        let (revision, _) = tokio::sync::watch::channel((0, 0));
        let dir = Arc::new(Self {
            tenants,
            keys: keys_cache,
            snap: RwLock::default(),
            revision,
        });
        dir.rebuild();
        let weak = Arc::downgrade(&dir);
        let (mut a, mut b) = (dir.tenants.changes(), dir.keys.changes());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = a.changed() => if r.is_err() { return },
                    r = b.changed() => if r.is_err() { return },
                }
                match weak.upgrade() {
                    Some(d) => d.rebuild(),
                    None => return,
                }
            }
        });
        Ok(dir)
    }

    fn rebuild(&self) {
        let rev = (self.tenants.revision(), self.keys.revision());
        let mut snap = Snapshot::default();
        for kv in self.tenants.snapshot() {
            if let Ok(t) = serde_json::from_slice::<TenantRecord>(&kv.value) {
                snap.tenants.insert(t.id.clone(), Arc::new(t));
            }
        }
        for kv in self.keys.snapshot() {
            if let (Some(sha), Ok(k)) = (
                kv.key.strip_prefix(keys::API_KEYS),
                serde_json::from_slice::<ApiKeyRecord>(&kv.value),
            ) {
                snap.key_ids.insert(k.id, k.tenant.clone());
                snap.keys.insert(sha.to_string(), k.tenant);
            }
        }
        *self.snap.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        self.revision.send_replace(rev);
    }

    fn snap(&self) -> Arc<Snapshot> {
        self.snap.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (bounded) until this gateway's view includes a write at `rev`.
    async fn wait_for(&self, rev: Revision) {
        let mut rx = self.revision.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            rx.wait_for(|r| r.0 >= rev || r.1 >= rev),
        )
        .await;
    }

    /// The tenant a presented key belongs to, if it is a live key of a live tenant.
    pub fn by_key(&self, presented: &str) -> Option<Arc<TenantRecord>> {
        if presented.is_empty() {
            return None;
        }
        let sha = ferry_core::id::sha256_hex(presented.as_bytes());
        let snap = self.snap();
        let tenant = snap.keys.get(&sha)?;
        snap.tenants.get(tenant).cloned()
    }

    /// The tenant of the live key with public id `id`.
    pub fn by_key_id(&self, id: &str) -> Option<Arc<TenantRecord>> {
        let snap = self.snap();
        let tenant = snap.key_ids.get(id)?;
        snap.tenants.get(tenant).cloned()
    }

    pub fn tenants(&self) -> Vec<Arc<TenantRecord>> {
        let mut v: Vec<_> = self.snap().tenants.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

// ---- The admin routes: /v1/tenants… ----

type St = State<Arc<AppState>>;
type Who = axum::Extension<Principal>;

fn tenant_json(t: &TenantRecord) -> serde_json::Value {
    json!({
        "id": t.id,
        "description": t.description,
        "created_ms": t.created_ms,
        "limits": t.limits,
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("tenant {id:?} not found"))
}

fn check_limits(l: &TenantLimits) -> ApiResult<()> {
    let bad_rate = |r: Option<f64>| r.is_some_and(|q| !(q.is_finite() && q > 0.0));
    if bad_rate(l.qps) || bad_rate(l.function_qps) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "qps and function_qps must be positive numbers",
        ));
    }
    if l.burst == Some(0) || l.function_concurrency == Some(0) || l.max_body == Some(0) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "burst, function_concurrency and max_body must be at least 1",
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    id: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    limits: TenantLimits,
}

pub async fn create(
    State(st): St,
    who: Who,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    who.require_admin()?;
    let bytes = read_body(&headers, body, 64 << 10).await?;
    let req: CreateTenant = parse_json(&bytes)?;
    if !ferry_core::id::valid_name(&req.id) || req.id.len() > 32 {
        return Err(ApiError::new(
            ErrorCode::InvalidName,
            format!(
                "{:?} is not a valid tenant id (1-32 lowercase letters, digits or '-', starting with a letter)",
                req.id
            ),
        ));
    }
    check_limits(&req.limits)?;
    let rec = TenantRecord {
        id: req.id.clone(),
        description: req.description,
        created_ms: ferry_core::now_ms(),
        limits: req.limits,
    };
    let key = keys::tenant(&rec.id);
    let r = st
        .store
        .txn(
            Txn::new()
                .when(Compare::absent(&key))
                .then(Op::put(&key, serde_json::to_vec(&rec).unwrap_or_default())),
        )
        .await?;
    if !r.succeeded {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("tenant {:?} already exists", rec.id),
        ));
    }
    st.directory.wait_for(r.revision).await;
    Ok((StatusCode::CREATED, Json(tenant_json(&rec))).into_response())
}

/// `GET /v1/callback-secret`: the secret the caller's task callbacks are signed with
/// (a tenant's own, derived from the operator's; the operator's for the admin).
pub async fn callback_secret(State(st): St, who: Who) -> ApiResult<Json<serde_json::Value>> {
    let Some(operator) = &st.cfg.callback_secret else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "callbacks are sent unsigned: the operator set no callback secret",
        ));
    };
    let (tenant, secret) = match &*who {
        Principal::Admin => (None, operator.clone()),
        Principal::Tenant(t) => (
            Some(t.id.clone()),
            ferry_core::id::tenant_callback_secret(operator, &t.id),
        ),
    };
    Ok(Json(json!({
        "tenant": tenant,
        "secret": secret,
        "header": "X-Ferry-Signature",
        "scheme": "t=<unix ms>,v1=<hex HMAC-SHA256(secret, \"<t>.<body>\")>",
    })))
}

pub async fn list(State(st): St, who: Who) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    let list: Vec<_> = st
        .directory
        .tenants()
        .iter()
        .map(|t| tenant_json(t))
        .collect();
    Ok(Json(json!({ "tenants": list })))
}

pub async fn get(
    State(st): St,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    let t = load(&st, &id).await?.0;
    Ok(Json(tenant_json(&t)))
}

async fn load(st: &AppState, id: &str) -> ApiResult<(TenantRecord, Revision)> {
    if !ferry_core::id::valid_name(id) {
        return Err(not_found(id));
    }
    let kv = st
        .store
        .get(&keys::tenant(id))
        .await?
        .ok_or_else(|| not_found(id))?;
    let t = serde_json::from_slice(&kv.value)
        .map_err(|e| Error::internal(format!("tenant record: {e}")))?;
    Ok((t, kv.mod_revision))
}

/// `PUT /v1/tenants/{id}/limits`: replaces the tenant's limits.
pub async fn set_limits(
    State(st): St,
    who: Who,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    let bytes = read_body(&headers, body, 64 << 10).await?;
    let limits: TenantLimits = parse_json(&bytes)?;
    check_limits(&limits)?;
    for _ in 0..8 {
        let (mut t, rev) = load(&st, &id).await?;
        t.limits = limits;
        let key = keys::tenant(&id);
        let r = st
            .store
            .txn(
                Txn::new()
                    .when(Compare::mod_revision(&key, rev))
                    .then(Op::put(&key, serde_json::to_vec(&t).unwrap_or_default())),
            )
            .await?;
        if r.succeeded {
            st.directory.wait_for(r.revision).await;
            return Ok(Json(tenant_json(&t)));
        }
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        "the tenant kept changing; retry",
    ))
}

/// `DELETE /v1/tenants/{id}`: removes the tenant and revokes its keys. Its functions
/// and tasks stay in the store (reachable with the admin token as `{id}.{name}`).
pub async fn delete(
    State(st): St,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    let (_, rev) = load(&st, &id).await?;
    let mut txn = Txn::new()
        .when(Compare::mod_revision(keys::tenant(&id), rev))
        .then(Op::delete(keys::tenant(&id)));
    let mut revoked = 0;
    for kv in st.store.range(keys::API_KEYS).await?.kvs {
        if serde_json::from_slice::<ApiKeyRecord>(&kv.value).is_ok_and(|k| k.tenant == id) {
            txn = txn.then(Op::delete(kv.key));
            revoked += 1;
        }
    }
    let r = st.store.txn(txn).await?;
    if !r.succeeded {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the tenant changed meanwhile; retry",
        ));
    }
    st.directory.wait_for(r.revision).await;
    Ok(Json(
        json!({ "id": id, "deleted": true, "keys_revoked": revoked }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    #[serde(default)]
    description: Option<String>,
}

/// `POST /v1/tenants/{id}/keys`: a new key, shown in this answer only.
pub async fn create_key(
    State(st): St,
    who: Who,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    who.require_admin()?;
    let bytes = read_body(&headers, body, 64 << 10).await?;
    let req: CreateKey = if bytes.iter().all(u8::is_ascii_whitespace) {
        CreateKey::default()
    } else {
        parse_json(&bytes)?
    };
    let (_, tenant_rev) = load(&st, &id).await?;
    let secret = format!("fk_{}", ferry_core::id::new_secret());
    let rec = ApiKeyRecord {
        id: ferry_core::id::new_id(),
        tenant: id.clone(),
        prefix: secret.chars().take(10).collect(),
        description: req.description,
        created_ms: ferry_core::now_ms(),
    };
    let key = keys::api_key(&ferry_core::id::sha256_hex(secret.as_bytes()));
    // Fenced on the tenant, so a key is never left behind a concurrent delete.
    let r = st
        .store
        .txn(
            Txn::new()
                .when(Compare::mod_revision(keys::tenant(&id), tenant_rev))
                .when(Compare::absent(&key))
                .then(Op::put(&key, serde_json::to_vec(&rec).unwrap_or_default())),
        )
        .await?;
    if !r.succeeded {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the tenant changed meanwhile; retry",
        ));
    }
    st.directory.wait_for(r.revision).await;
    tracing::info!(tenant = %id, key_id = %rec.id, "api key created");
    let mut v = serde_json::to_value(&rec).unwrap_or_default();
    v["key"] = json!(secret);
    // The same key as an AWS SigV4 pair (for the Lambda API); the secret is derived, not
    // stored (see sigv4.rs).
    v["aws_access_key_id"] = json!(crate::sigv4::access_key_id(&rec.id));
    v["aws_secret_access_key"] = json!(crate::sigv4::secret_access_key(&st.cfg.token, &rec.id));
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub async fn list_keys(
    State(st): St,
    who: Who,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    load(&st, &id).await?;
    let mut list: Vec<ApiKeyRecord> = st
        .store
        .range(keys::API_KEYS)
        .await?
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<ApiKeyRecord>(&kv.value).ok())
        .filter(|k| k.tenant == id)
        .collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(json!({ "keys": list })))
}

pub async fn revoke_key(
    State(st): St,
    who: Who,
    Path((id, key_id)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    load(&st, &id).await?;
    let found = st
        .store
        .range(keys::API_KEYS)
        .await?
        .kvs
        .into_iter()
        .find(|kv| {
            serde_json::from_slice::<ApiKeyRecord>(&kv.value)
                .is_ok_and(|k| k.tenant == id && k.id == key_id)
        })
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("tenant {id:?} has no key {key_id:?}"),
            )
        })?;
    let r = st.store.txn(Txn::new().then(Op::delete(found.key))).await?;
    st.directory.wait_for(r.revision).await;
    tracing::info!(tenant = %id, %key_id, "api key revoked");
    Ok(Json(json!({ "tenant": id, "id": key_id, "revoked": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> Principal {
        Principal::Tenant(Arc::new(TenantRecord {
            id: id.into(),
            description: None,
            created_ms: 0,
            limits: TenantLimits::default(),
        }))
    }

    #[test]
    fn a_tenant_sees_only_its_own_prefix() {
        let a = tenant("acme");
        assert_eq!(a.internal("hello"), "acme.hello");
        assert!(a.owns("acme.hello"));
        assert!(
            !a.owns("acme2.hello"),
            "a longer tenant id is another tenant"
        );
        assert!(!a.owns("hello"));
        assert!(!a.owns("acmehello"));
        assert_eq!(a.external("acme.hello"), "hello");
        let admin = Principal::Admin;
        assert!(admin.owns("acme.hello") && admin.owns("hello"));
        assert_eq!(admin.internal("acme.hello"), "acme.hello");
        assert_eq!(shown("acme.hello"), "hello");
        assert_eq!(shown("hello"), "hello");
    }
}
