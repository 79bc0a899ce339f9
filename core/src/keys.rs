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

/// Listing indexes of tasks, newest first, written with the task and removed with it:
/// by function, `/ferry/tix/f/{function}/{position}`, and by owner (the tenant, or
/// [`OPERATOR_OWNER`] for the operator's functions), `/ferry/tix/o/{owner}/{position}`.
/// A position is `{9999999999999 - created_ms:013}/{task_id}`, so an ascending range
/// reads the newest first. Values: the function's internal name.
pub const TASK_INDEX: &str = "/ferry/tix/";
/// The owner of operator functions (no tenant) in the listing index.
pub const OPERATOR_OWNER: &str = "-";
/// The largest creation time a position can hold (year 2286).
const LAST_MS: u64 = 9_999_999_999_999;
pub fn tasks_of_function(function: &str) -> String {
    format!("{TASK_INDEX}f/{function}/")
}
pub fn tasks_of_owner(owner: &str) -> String {
    format!("{TASK_INDEX}o/{owner}/")
}
/// The tenant of a function by its internal name (`{tenant}.{name}`), else
/// [`OPERATOR_OWNER`].
pub fn owner_of(function: &str) -> &str {
    function
        .split_once('.')
        .map_or(OPERATOR_OWNER, |(tenant, _)| tenant)
}
/// A task's place in the listing indexes.
pub fn task_position(created_ms: u64, task_id: &str) -> String {
    format!("{:013}/{task_id}", LAST_MS - created_ms.clamp(1, LAST_MS))
}
/// The positions of tasks created before `ms` are at or after this bound; those of
/// tasks created at or after `ms` are before it.
pub fn position_bound(ms: u64) -> String {
    format!("{:013}", LAST_MS - ms.clamp(1, LAST_MS) + 1)
}
/// A task's two index keys (by function, by owner).
pub fn task_index(function: &str, created_ms: u64, task_id: &str) -> [String; 2] {
    let pos = task_position(created_ms, task_id);
    [
        format!("{}{pos}", tasks_of_function(function)),
        format!("{}{pos}", tasks_of_owner(owner_of(function))),
    ]
}
/// Marks a store whose tasks from before the index were indexed.
pub const TASK_INDEX_READY: &str = "/ferry/meta/task-index";

/// `QueueEntry` per queued task, per cluster: written in the same transaction as the
/// task, so its mod_revision is the task's; order-servers claim from here.
pub const QUEUE: &str = "/ferry/queue/";
pub fn queue_of(cluster: &str) -> String {
    format!("{QUEUE}{cluster}/")
}
pub fn queued(cluster: &str, task_id: &str) -> String {
    format!("{QUEUE}{cluster}/{task_id}")
}

/// Running keys of stores from before claim marks (`QueueEntry::claim`): one per
/// running task, under its instance's incarnation. Nothing writes them any more; the
/// orphan sweep still re-queues those of gone incarnations, so no task is lost across
/// the upgrade.
pub const RUNNING: &str = "/ferry/running/";
pub fn running_of(cluster: &str) -> String {
    format!("{RUNNING}{cluster}/")
}

/// The latest progress report of a running task (`TaskProgress`), apart from the task
/// so that reports never move the task's revision; deleted with every commit.
pub const PROGRESS: &str = "/ferry/progress/";
pub fn progress(task_id: &str) -> String {
    format!("{PROGRESS}{task_id}")
}

/// Finished tasks by the second they finished, for retention:
/// `/ferry/done/{cluster}/{second:011}/{task_id}`. The value is [`done_value`] for the
/// task the key names (empty in stores from before the listing index), or
/// [`done_group_value`] for tasks committed together in one transaction (the key named
/// after the first): one key for the group, not one write per task.
pub const DONE: &str = "/ferry/done/";
pub fn done_of(cluster: &str) -> String {
    format!("{DONE}{cluster}/")
}
pub fn done(cluster: &str, finished_ms: u64, task_id: &str) -> String {
    format!("{DONE}{cluster}/{:011}/{task_id}", finished_ms / 1000)
}

/// What a finish-time key holds: enough to find the task's index keys.
pub fn done_value(created_ms: u64, function: &str) -> Vec<u8> {
    format!("{created_ms} {function}").into_bytes()
}
/// The (created_ms, function) of a finish-time key's value.
pub fn parse_done_value(v: &[u8]) -> Option<(u64, &str)> {
    let (ms, f) = std::str::from_utf8(v).ok()?.split_once(' ')?;
    Some((ms.parse().ok()?, f))
}

const DONE_GROUP: &str = "group\n";

/// A finish-time key's value for several tasks: `group` then a line per task,
/// `{task_id} {created_ms} {function}`.
pub fn done_group_value<'a>(tasks: impl IntoIterator<Item = (&'a str, u64, &'a str)>) -> Vec<u8> {
    let mut v = DONE_GROUP.to_string();
    for (id, created_ms, function) in tasks {
        v.push_str(&format!("{id} {created_ms} {function}\n"));
    }
    v.into_bytes()
}

/// The tasks a finish-time key stands for, each with its (created_ms, function) when
/// the value says it (`None`: a key from before the listing index, whose task record
/// says it).
pub fn done_tasks<'a>(key: &'a str, value: &'a [u8]) -> Vec<(&'a str, Option<(u64, &'a str)>)> {
    let text = std::str::from_utf8(value).unwrap_or_default();
    if let Some(lines) = text.strip_prefix(DONE_GROUP) {
        return lines
            .lines()
            .filter_map(|line| {
                let (id, rest) = line.split_once(' ')?;
                Some((id, parse_done_value(rest.as_bytes())))
            })
            .collect();
    }
    let id = key.rsplit('/').next().unwrap_or_default();
    vec![(id, parse_done_value(value))]
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
    fn task_positions_sort_newest_first_within_time_bounds() {
        let older = task_position(1_700_000_000_000, "b");
        let newer = task_position(1_700_000_000_001, "a");
        assert!(newer < older);
        // Created at or after the bound's time: before it; created earlier: after it.
        let bound = position_bound(1_700_000_000_001);
        assert!(newer < bound && older >= bound);
        assert!(task_position(1, "x") < position_bound(1));
        assert!(task_position(LAST_MS, "x") < position_bound(1));
        let [f, o] = task_index("acme.resize", 5, "t1");
        assert!(f.starts_with(&tasks_of_function("acme.resize")));
        assert!(o.starts_with(&tasks_of_owner("acme")));
        assert!(task_index("resize", 5, "t1")[1].starts_with(&tasks_of_owner(OPERATOR_OWNER)));
        assert!(!tasks_of_function("acme.resize2").starts_with(&tasks_of_function("acme.resize")));
        let v = done_value(42, "acme.resize");
        assert_eq!(parse_done_value(&v), Some((42, "acme.resize")));
        assert_eq!(parse_done_value(b""), None);
        let key = done("c", 5_000, "t1");
        assert_eq!(done_tasks(&key, &v), [("t1", Some((42, "acme.resize")))]);
        assert_eq!(
            done_tasks(&key, b""),
            [("t1", None)],
            "before the listing index"
        );
        let g = done_group_value([("t1", 42, "acme.resize"), ("t2", 43, "f")]);
        assert_eq!(
            done_tasks(&key, &g),
            [("t1", Some((42, "acme.resize"))), ("t2", Some((43, "f")))]
        );
    }

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
