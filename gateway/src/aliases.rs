//! Aliases: a name (`prod`, `canary`) for one version of a function, or for a weighted
//! split between versions (a canary at 10%). Invoked as `name:alias`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use ferry_core::model::{AliasRecord, AliasRoute};
use ferry_core::{Error, ErrorCode, keys};
use ferry_store::{Compare, Op, Txn};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::api::{parse_json, read_body};
use crate::error::{ApiError, ApiResult};
use crate::tenancy::{Principal, shown};

type St = State<Arc<AppState>>;
type Who = axum::Extension<Principal>;

/// Most versions one alias may split between.
const MAX_ROUTES: usize = 16;

fn alias_json(who: &Principal, a: &AliasRecord) -> serde_json::Value {
    json!({
        "function": who.external(&a.function),
        "alias": a.alias,
        "routes": a.routes,
        "updated_ms": a.updated_ms,
    })
}

pub async fn list(
    State(st): St,
    who: Who,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let name = who.internal(&name);
    st.catalog.function(&name).await?;
    let list: Vec<_> = st
        .catalog
        .aliases_of(&name)
        .iter()
        .map(|a| alias_json(&who, a))
        .collect();
    Ok(Json(json!({ "aliases": list })))
}

pub async fn get(
    State(st): St,
    who: Who,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let a = st.catalog.alias(&who.internal(&name), &alias).await?;
    Ok(Json(alias_json(&who, &a)))
}

/// `{"version": 3}` or `{"routes": [{"version": 3, "weight": 90}, …]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAlias {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    routes: Option<Vec<AliasRoute>>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, msg)
}

/// Checks a route set: 1–16 distinct versions, weights summing to more than zero.
fn check_routes(routes: &[AliasRoute]) -> ApiResult<()> {
    if routes.is_empty() || routes.len() > MAX_ROUTES {
        return Err(bad(format!("an alias routes to 1-{MAX_ROUTES} versions")));
    }
    let mut seen: Vec<u32> = routes.iter().map(|r| r.version).collect();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != routes.len() {
        return Err(bad("each version may appear once in an alias"));
    }
    let total: u64 = routes.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 || total > 1_000_000 {
        return Err(bad("alias weights must add up to 1..1000000"));
    }
    Ok(())
}

/// `PUT /v1/functions/{name}/aliases/{alias}`: creates or moves the alias. Every version
/// it names must exist (versions are immutable, so it stays valid).
pub async fn set(
    State(st): St,
    who: Who,
    Path((name, alias)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let internal = who.internal(&name);
    st.catalog.function(&internal).await?;
    if !ferry_core::id::valid_name(&alias) || alias == "latest" {
        return Err(ApiError::new(
            ErrorCode::InvalidName,
            format!(
                "{alias:?} is not a valid alias (lowercase letters, digits or '-', starting with a letter; not \"latest\")"
            ),
        ));
    }
    let bytes = read_body(&headers, body, 64 << 10).await?;
    let req: SetAlias = parse_json(&bytes)?;
    let routes = match (req.version, req.routes) {
        (Some(v), None) => vec![AliasRoute {
            version: v,
            weight: 100,
        }],
        (None, Some(r)) => r,
        _ => return Err(bad("give either \"version\" or \"routes\"")),
    };
    check_routes(&routes)?;
    for r in &routes {
        st.catalog.version(&internal, Some(r.version)).await?;
    }
    let rec = AliasRecord {
        function: internal.clone(),
        alias: alias.clone(),
        routes,
        updated_ms: ferry_core::now_ms(),
    };
    // Only while the function exists (it is never deleted today; this keeps it so).
    let r = st
        .store
        .txn(
            Txn::new()
                .when(Compare::exists(keys::function(&internal)))
                .then(Op::put(
                    keys::alias(&internal, &alias),
                    serde_json::to_vec(&rec).unwrap_or_default(),
                )),
        )
        .await?;
    if !r.succeeded {
        return Err(Error::new(
            ErrorCode::FunctionNotFound,
            format!("function {:?} not found", shown(&internal)),
        )
        .into());
    }
    st.catalog.wait_for_alias(r.revision).await;
    tracing::info!(function = %internal, %alias, routes = ?rec.routes, "alias set");
    Ok(Json(alias_json(&who, &rec)))
}

pub async fn delete(
    State(st): St,
    who: Who,
    Path((name, alias)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let internal = who.internal(&name);
    st.catalog.alias(&internal, &alias).await?;
    let r = st
        .store
        .txn(Txn::new().then(Op::delete(keys::alias(&internal, &alias))))
        .await?;
    st.catalog.wait_for_alias(r.revision).await;
    Ok(Json(
        json!({ "function": name, "alias": alias, "deleted": true }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(version: u32, weight: u32) -> AliasRoute {
        AliasRoute { version, weight }
    }

    #[test]
    fn route_sets_are_checked() {
        assert!(check_routes(&[r(3, 90), r(4, 10)]).is_ok());
        assert!(check_routes(&[r(3, 0), r(4, 1)]).is_ok());
        assert!(check_routes(&[]).is_err());
        assert!(check_routes(&[r(3, 0)]).is_err(), "no weight");
        assert!(check_routes(&[r(3, 50), r(3, 50)]).is_err(), "twice");
    }
}
