//! Records Ferry keeps in the store (JSON values under the keys in [`crate::keys`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::package::{Kind, Limits, Resources};
use crate::proto;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Highest version number; 0 before the first upload.
    pub latest_version: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub size: u64,
    pub kind: Kind,
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(default)]
    pub retry: crate::task::RetryPolicy,
    pub created_ms: u64,
}

impl VersionRecord {
    /// What an order-server and a node agent need to run this version.
    pub fn spec(&self) -> proto::FunctionSpec {
        proto::FunctionSpec {
            name: self.name.clone(),
            version: self.version,
            package_sha256: self.sha256.clone(),
            kind: self.kind.as_str().to_string(),
            memory_mb: self.limits.memory_mb,
            timeout_ms: self.limits.timeout_ms,
            cpu_millis: self.limits.cpu_millis,
            package_size: self.size,
            gpus: self.resources.gpus,
            fpga_slots: self.resources.fpga_slots,
            required_tags: self.resources.required_tags.clone(),
            preferred_tags: self.resources.preferred_tags.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub sha256: String,
    pub size: u64,
    pub kind: Kind,
    pub created_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    pub id: String,
    /// Base URL node agents fetch packages from, e.g. `http://127.0.0.1:7070`.
    pub url: String,
}

/// What a node offers (declared) or holds (used).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub gpus: u32,
    pub fpga_slots: u32,
    pub slots: u32,
}

impl From<&proto::Resources> for Capacity {
    fn from(r: &proto::Resources) -> Self {
        Self {
            cpu_millis: r.cpu_millis,
            memory_mb: r.memory_mb,
            gpus: r.gpus,
            fpga_slots: r.fpga_slots,
            slots: r.slots,
        }
    }
}

impl From<Capacity> for proto::Resources {
    fn from(c: Capacity) -> Self {
        Self {
            cpu_millis: c.cpu_millis,
            memory_mb: c.memory_mb,
            gpus: c.gpus,
            fpga_slots: c.fpga_slots,
            slots: c.slots,
        }
    }
}

/// A node's state as recorded in the store (transitions only; heartbeats stay in memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Attached,
    /// Silent past the suspect threshold: no new work, not yet failed over.
    Suspect,
    /// Its circuit breaker is open: no new work until a probe succeeds.
    Ejected,
    Dead,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Attached => "attached",
            NodeState::Suspect => "suspect",
            NodeState::Ejected => "ejected",
            NodeState::Dead => "dead",
        }
    }
}

/// What an operator set for a node (`ferry node drain|eject|restore`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeAdmin {
    /// Normal placement (a restore also closes the node's circuit breakers).
    #[default]
    Active,
    /// No new work; running work finishes.
    Draining,
    /// Taken out by hand: no new work until restored.
    Ejected,
}

impl NodeAdmin {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAdmin::Active => "active",
            NodeAdmin::Draining => "draining",
            NodeAdmin::Ejected => "ejected",
        }
    }
}

/// `/ferry/node-admin/{cluster}/{node}`: the operator's word on a node; it outlives the
/// node's attachments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAdminRecord {
    pub node: String,
    pub state: NodeAdmin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub since_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub cluster: String,
    pub state: NodeState,
    /// The order-server instance the node is attached to (its only owner).
    pub order_server: String,
    pub capacity: Capacity,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub since_ms: u64,
    /// The node's circuit breaker, once it has been ejected: carried to the instance
    /// the node attaches to next, so moving (or reconnecting) neither ends an ejection
    /// nor shortens the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerRecord>,
    /// The node × function breakers that were ejected, by function (the same way).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub function_breakers: BTreeMap<String, BreakerRecord>,
}

/// A node breaker's state as the store keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerRecord {
    /// Ejections so far (the next one lasts longer).
    pub ejections: u32,
    /// Ejected until then (ms since the epoch); 0: closed. A time in the past: the
    /// half-open probe is due.
    pub until_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderServerRecord {
    pub id: String,
    pub cluster: String,
    /// gRPC endpoint, e.g. `http://127.0.0.1:7171`.
    pub addr: String,
    /// Nodes attached to this instance right now.
    pub nodes: u32,
    /// Sum of the attached nodes' declared capacity.
    pub capacity: Capacity,
    pub started_ms: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Active,
    Draining,
}

/// Operator settings of a cluster (`/ferry/clusters/{name}`); absent means defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    #[serde(default)]
    pub admin_state: AdminState,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedServer {
    pub id: String,
    pub addr: String,
    pub nodes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedCluster {
    pub name: String,
    pub weight: u32,
    pub admin_state: AdminState,
    pub capacity: Capacity,
    pub nodes: u32,
    /// Instances with at least one attached node, in a stable order.
    pub order_servers: Vec<RoutedServer>,
}

/// Published by the cluster-scheduler; gateways route by it and never compute it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingTable {
    pub clusters: Vec<RoutedCluster>,
}

/// A tenant (`/ferry/tenants/{id}`): its functions and tasks are visible only to its own
/// keys and to the admin token. Limits are enforced by every gateway on its own (N
/// gateways admit up to N times a QPS limit).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_ms: u64,
    #[serde(default)]
    pub limits: TenantLimits,
}

/// A tenant's limits; `None` is unlimited (bounded by the gateway's own limits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// Requests per second across the tenant's invocations (token bucket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qps: Option<f64>,
    /// Bucket size: requests admitted at once after a quiet spell (default: max(1, qps)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Requests per second per function of the tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_qps: Option<f64>,
    /// Synchronous invocations in flight per function, per gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_concurrency: Option<u32>,
    /// Largest invocation body in bytes (at most the gateway's own limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body: Option<u64>,
}

/// A tenant API key (`/ferry/apikeys/{sha256 of the key}`): the key is shown once, at
/// creation, and only its hash is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public id, for listing and revoking.
    pub id: String,
    pub tenant: String,
    /// The key's first characters, to recognise it (not enough to use it).
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_ms: u64,
}

/// One target of an alias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasRoute {
    pub version: u32,
    pub weight: u32,
}

/// An alias of a function (`/ferry/alias/{function}/{alias}`): one version, or a
/// weighted split between versions (a canary).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasRecord {
    /// The function's internal name.
    pub function: String,
    pub alias: String,
    pub routes: Vec<AliasRoute>,
    pub updated_ms: u64,
}

/// A batch re-run (`/ferry/reruns/{id}`): which tasks a selection matched and the new
/// tasks submitted for them (on the batch priority class).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RerunRecord {
    pub id: String,
    /// The function's internal name.
    pub function: String,
    /// The selection, as given.
    pub filter: serde_json::Value,
    pub selected: u32,
    /// (original task, new task) pairs.
    pub tasks: Vec<(String, String)>,
    pub created_ms: u64,
}

/// The queue every task without one goes to.
pub const DEFAULT_QUEUE: &str = "default";
/// The queue batch re-runs go to unless they name another.
pub const RERUN_QUEUE: &str = "reruns";
/// How many tasks of a `reruns` queue run at once in a cluster until an operator
/// configures that queue: re-runs must never crowd out online work.
pub const RERUN_QUEUE_MRT: u32 = 4;

/// A queue (`/ferry/queues/{internal name}`): the limits a tenant's or business line's
/// async tasks share. Tasks name a queue when submitted (else `default`); the gateway
/// holds submissions to `qps`, order-servers hold running tasks to `mrt` when they
/// claim, and `priority` is the class of tasks that do not ask for one. A queue with no
/// record is unlimited (`reruns` excepted, see [`QueueRecord::implicit`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueRecord {
    /// Internal name: `{tenant}.{name}` for a tenant's queue, `name` for the operator's.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Submissions per second (token bucket, per gateway replica like every QPS limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Max running tasks of the queue in one cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrt: Option<u32>,
    /// The class of tasks submitted without one.
    #[serde(default)]
    pub priority: crate::task::Priority,
    pub updated_ms: u64,
}

impl QueueRecord {
    /// What a queue without a record means: no limits, normal class; except the
    /// `reruns` queues, which are batch class with an MRT of [`RERUN_QUEUE_MRT`].
    pub fn implicit(internal: &str) -> Self {
        let short = internal.rsplit('.').next().unwrap_or(internal);
        let tenant = internal.rsplit_once('.').map(|(t, _)| t.to_string());
        let rerun = short == RERUN_QUEUE;
        Self {
            name: internal.to_string(),
            tenant,
            description: None,
            qps: None,
            burst: None,
            mrt: rerun.then_some(RERUN_QUEUE_MRT),
            priority: if rerun {
                crate::task::Priority::Batch
            } else {
                crate::task::Priority::Normal
            },
            updated_ms: 0,
        }
    }
}
