//! The store's key schema. Every key Ferry writes is built here, so the layout can be
//! read in one place. Prefix ranges always end in `/` so `hello` never matches `hello2`.

pub const ROOT: &str = "/ferry/";

/// `FunctionRecord` per function.
pub const FUNCTIONS: &str = "/ferry/fn/";
pub fn function(name: &str) -> String {
    format!("{FUNCTIONS}{name}")
}

/// `VersionRecord` per immutable version.
pub const VERSIONS: &str = "/ferry/fnver/";
pub fn versions_of(name: &str) -> String {
    format!("{VERSIONS}{name}/")
}
pub fn version(name: &str, version: u32) -> String {
    // Zero-padded so a range returns versions in numeric order.
    format!("{VERSIONS}{name}/{version:010}")
}

/// `PackageRecord` per stored package (by sha256).
pub const PACKAGES: &str = "/ferry/pkg/";
pub fn package(sha256: &str) -> String {
    format!("{PACKAGES}{sha256}")
}

/// `GatewayRecord` per live gateway, under its lease.
pub const GATEWAYS: &str = "/ferry/gateways/";
pub fn gateway(id: &str) -> String {
    format!("{GATEWAYS}{id}")
}

/// `ClusterRecord` per cluster (admin state, weight), written by operators.
pub const CLUSTERS: &str = "/ferry/clusters/";
pub fn cluster(name: &str) -> String {
    format!("{CLUSTERS}{name}")
}

/// `OrderServerRecord` per live order-server instance, under its lease.
pub const ORDER_SERVERS: &str = "/ferry/order-servers/";
pub fn order_servers_of(cluster: &str) -> String {
    format!("{ORDER_SERVERS}{cluster}/")
}
pub fn order_server(cluster: &str, id: &str) -> String {
    format!("{ORDER_SERVERS}{cluster}/{id}")
}

/// `NodeRecord` per node agent: written on transitions only (attached, dead).
pub const NODES: &str = "/ferry/nodes/";
pub fn nodes_of(cluster: &str) -> String {
    format!("{NODES}{cluster}/")
}
pub fn node(cluster: &str, id: &str) -> String {
    format!("{NODES}{cluster}/{id}")
}

/// `NodeAdminRecord` per node an operator drained, ejected or restored.
pub const NODE_ADMIN: &str = "/ferry/node-admin/";
pub fn node_admin_of(cluster: &str) -> String {
    format!("{NODE_ADMIN}{cluster}/")
}
pub fn node_admin(cluster: &str, id: &str) -> String {
    format!("{NODE_ADMIN}{cluster}/{id}")
}

/// The routing table the cluster-scheduler publishes and every gateway watches.
pub const ROUTING: &str = "/ferry/routing";

/// `TaskRecord` per async task (ids sort by creation time).
pub const TASKS: &str = "/ferry/tasks/";
pub fn task(id: &str) -> String {
    format!("{TASKS}{id}")
}

/// `QueueEntry` per queued task, per cluster: written in the same transaction as the
/// task, so its mod_revision is the task's; order-servers claim from here.
pub const QUEUE: &str = "/ferry/queue/";
pub fn queue_of(cluster: &str) -> String {
    format!("{QUEUE}{cluster}/")
}
pub fn queued(cluster: &str, task_id: &str) -> String {
    format!("{QUEUE}{cluster}/{task_id}")
}

/// One key per running task, under the order-server instance that owns it, so
/// orphans of a dead instance can be found and re-queued.
pub const RUNNING: &str = "/ferry/running/";
pub fn running_of(cluster: &str) -> String {
    format!("{RUNNING}{cluster}/")
}
pub fn running(cluster: &str, instance: &str, task_id: &str) -> String {
    format!("{RUNNING}{cluster}/{instance}/{task_id}")
}

/// The latest progress report of a running task (`TaskProgress`), apart from the task
/// so that reports never move the task's revision; deleted with every commit.
pub const PROGRESS: &str = "/ferry/progress/";
pub fn progress(task_id: &str) -> String {
    format!("{PROGRESS}{task_id}")
}

/// Finished tasks by the second they finished, for retention:
/// `/ferry/done/{cluster}/{second:011}/{task_id}` (empty values).
pub const DONE: &str = "/ferry/done/";
pub fn done_of(cluster: &str) -> String {
    format!("{DONE}{cluster}/")
}
pub fn done(cluster: &str, finished_ms: u64, task_id: &str) -> String {
    format!("{DONE}{cluster}/{:011}/{task_id}", finished_ms / 1000)
}

/// `CallbackRecord` per finished task whose callback is not delivered yet.
pub const CALLBACKS: &str = "/ferry/callbacks/";
pub fn callbacks_of(cluster: &str) -> String {
    format!("{CALLBACKS}{cluster}/")
}
pub fn callback(cluster: &str, task_id: &str) -> String {
    format!("{CALLBACKS}{cluster}/{task_id}")
}

/// A cancellation request for a running task (the owner tells the node).
pub const CANCELS: &str = "/ferry/cancel/";
pub fn cancel(task_id: &str) -> String {
    format!("{CANCELS}{task_id}")
}

/// Idempotency keys: `{scope}/{sha256 of the key}` → the task id.
pub const IDEMPOTENCY: &str = "/ferry/idem/";
pub fn idempotency(scope: &str, key: &str) -> String {
    format!(
        "{IDEMPOTENCY}{scope}/{}",
        crate::id::sha256_hex(key.as_bytes())
    )
}

/// `TenantRecord` per tenant (`/ferry/tenants/{id}`).
pub const TENANTS: &str = "/ferry/tenants/";
pub fn tenant(id: &str) -> String {
    format!("{TENANTS}{id}")
}

/// `ApiKeyRecord` per tenant API key, keyed by the sha256 of the key: the key itself is
/// never stored, and a presented key is found by hashing it.
pub const API_KEYS: &str = "/ferry/apikeys/";
pub fn api_key(sha256: &str) -> String {
    format!("{API_KEYS}{sha256}")
}

/// The internal name of tenant `tenant`'s function `name`: `{tenant}.{name}`. A `.` is
/// never part of a function or tenant name, so the qualified name cannot collide with an
/// unqualified one, and order-servers and node agents treat it as an opaque name.
pub fn tenant_function(tenant: &str, name: &str) -> String {
    format!("{tenant}.{name}")
}

/// `AliasRecord` per function alias (`prod`, `canary`): weighted versions.
pub const ALIASES: &str = "/ferry/alias/";
pub fn aliases_of(function: &str) -> String {
    format!("{ALIASES}{function}/")
}
pub fn alias(function: &str, alias: &str) -> String {
    format!("{ALIASES}{function}/{alias}")
}

/// `RerunRecord` per batch re-run (`POST /v1/reruns`).
pub const RERUNS: &str = "/ferry/reruns/";
pub fn rerun(id: &str) -> String {
    format!("{RERUNS}{id}")
}

/// `QueueRecord` per queue (a tenant's or business line's limits on its async tasks),
/// keyed by the queue's internal name (`{tenant}.{name}`, like a function's).
pub const QUEUES: &str = "/ferry/queues/";
pub fn queue_def(internal: &str) -> String {
    format!("{QUEUES}{internal}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_do_not_overlap_between_names() {
        assert!(!version("hello2", 1).starts_with(&versions_of("hello")));
        assert!(version("hello", 1).starts_with(&versions_of("hello")));
        assert!(version("hello", 2) < version("hello", 10));
        assert!(!node("a", "n1").starts_with(&nodes_of("ab")));
        assert!(!alias("hello2", "prod").starts_with(&aliases_of("hello")));
        assert_eq!(tenant_function("acme", "hello"), "acme.hello");
    }
}
