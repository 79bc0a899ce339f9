//! `/v1/nodes`: every node's state (live from the order-servers, recorded transitions
//! from the store for nodes no instance holds now), and the operator's drain, eject and
//! restore.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use ferry_core::model::{Capacity, NodeAdmin, NodeAdminRecord, NodeRecord};
use ferry_core::proto::{BreakerStatus, NodeStatus};
use ferry_core::{Error, ErrorCode, keys};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiResult;
use crate::tenancy::Principal;

type St = State<Arc<AppState>>;
type Who = axum::Extension<Principal>;

/// How long the listing waits for an order-server's live view.
const LIVE_TIMEOUT: Duration = Duration::from_secs(2);

fn breaker(b: &BreakerStatus) -> Value {
    let mut v = json!({
        "state": b.state,
        "ejections": b.ejections,
        "ejected_for_ms": b.ejected_for_ms,
        "consecutive_failures": b.consecutive_failures,
    });
    if !b.function.is_empty() {
        v["function"] = json!(b.function);
    }
    v
}

/// A node as its order-server sees it now; `recorded`: its last transition in the store.
fn live(cluster: &str, server: &str, n: &NodeStatus, recorded: Option<&NodeRecord>) -> Value {
    let since_ms = recorded.map(|r| r.since_ms).unwrap_or_default();
    let cap = n.capacity.as_ref().map(Capacity::from).unwrap_or_default();
    let used = n.used.as_ref().map(Capacity::from).unwrap_or_default();
    json!({
        "id": n.node_id,
        "cluster": cluster,
        "state": n.state,
        "admin": n.admin,
        "order_server": server,
        "capacity": cap,
        "used": used,
        "tags": n.tags,
        "labels": n.labels.iter().collect::<BTreeMap<_, _>>(),
        "running": n.running,
        "breaker": n.breaker.as_ref().map(breaker),
        "function_breakers": n.function_breakers.iter().map(breaker).collect::<Vec<_>>(),
        "last_heartbeat_ms": n.last_heartbeat_ms,
        "since_ms": since_ms,
        "recorded": recorded.map(|r| r.state.as_str()),
    })
}

fn recorded(r: &NodeRecord, admin: NodeAdmin) -> Value {
    let state = r.state.as_str();
    json!({
        "id": r.id,
        "cluster": r.cluster,
        "state": state,
        "admin": admin.as_str(),
        "order_server": r.order_server,
        "capacity": r.capacity,
        "tags": r.tags,
        "labels": r.labels,
        "since_ms": r.since_ms,
        "recorded": state,
    })
}

/// `GET /v1/nodes`: live nodes first-hand; the others as last recorded.
pub async fn list(State(st): St, who: Who) -> ApiResult<Json<Value>> {
    who.require_admin()?;
    let (records, admins) = tokio::try_join!(
        st.store.range(keys::NODES),
        st.store.range(keys::NODE_ADMIN)
    )?;
    let records: BTreeMap<(String, String), NodeRecord> = records
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
        .map(|r| ((r.cluster.clone(), r.id.clone()), r))
        .collect();
    let admins: BTreeMap<String, NodeAdmin> = admins
        .kvs
        .iter()
        .filter_map(|kv| {
            let rest = kv.key.strip_prefix(keys::NODE_ADMIN)?;
            let r = serde_json::from_slice::<NodeAdminRecord>(&kv.value).ok()?;
            Some((rest.to_string(), r.state))
        })
        .collect();
    let mut out: BTreeMap<(String, String), Value> = BTreeMap::new();
    for (cluster, server, n) in st.router.live_nodes(LIVE_TIMEOUT).await {
        let key = (cluster.clone(), n.node_id.clone());
        let rec = records.get(&key);
        out.insert(key, live(&cluster, &server, &n, rec));
    }
    for (key, r) in &records {
        if !out.contains_key(key) {
            let admin = admins
                .get(&format!("{}/{}", key.0, key.1))
                .copied()
                .unwrap_or_default();
            out.insert(key.clone(), recorded(r, admin));
        }
    }
    Ok(Json(
        json!({ "nodes": out.into_values().collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
pub struct AdminQuery {
    /// The node's cluster; needed only when the id is recorded in several.
    cluster: Option<String>,
    reason: Option<String>,
}

/// `POST /v1/nodes/{id}/{drain|eject|restore}`: the operator's word on a node, kept in
/// the store so it outlives the node's attachments and every order-server honours it.
pub async fn admin(
    State(st): St,
    who: Who,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<AdminQuery>,
) -> ApiResult<Json<Value>> {
    who.require_admin()?;
    let state = match action.as_str() {
        "drain" => NodeAdmin::Draining,
        "eject" => NodeAdmin::Ejected,
        "restore" => NodeAdmin::Active,
        other => {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("no node action {other:?}: use drain, eject or restore"),
            )
            .into());
        }
    };
    if q.reason.as_ref().is_some_and(|r| r.len() > 512) {
        return Err(Error::new(ErrorCode::BadRequest, "reason is longer than 512 bytes").into());
    }
    let nodes = st.store.range(keys::NODES).await?;
    let mut clusters: Vec<String> = nodes
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
        .filter(|r| r.id == id && q.cluster.as_ref().is_none_or(|c| *c == r.cluster))
        .map(|r| r.cluster)
        .collect();
    clusters.dedup();
    let cluster = match clusters.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(Error::new(ErrorCode::NotFound, format!("no node {id:?}")).into());
        }
        _ => {
            return Err(Error::new(
                ErrorCode::BadRequest,
                format!("node {id:?} is known in several clusters; add ?cluster=NAME"),
            )
            .into());
        }
    };
    let record = NodeAdminRecord {
        node: id.clone(),
        state,
        reason: q.reason,
        since_ms: ferry_core::now_ms(),
    };
    st.store
        .put(
            &keys::node_admin(&cluster, &id),
            serde_json::to_vec(&record).map_err(|e| Error::internal(e.to_string()))?,
            0,
        )
        .await?;
    tracing::info!(node_id = %id, %cluster, admin = state.as_str(), "node admin state set");
    Ok(Json(
        json!({ "node": id, "cluster": cluster, "admin": state.as_str() }),
    ))
}
