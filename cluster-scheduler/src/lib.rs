//! The cluster-scheduler keeps the table of clusters and publishes the routing table
//! (`/ferry/routing`) that every gateway routes by. It is never on the hot path: it
//! watches order-server registrations and operator settings, recomputes the table with
//! the pure [`build_table`], and writes it only when it changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::keys;
use ferry_core::model::{
    AdminState, Capacity, ClusterRecord, OrderServerRecord, RoutedCluster, RoutedServer,
    RoutingTable,
};
use ferry_store::{Store, StoreError, WatchCache};
use tracing::{info, warn};

/// Builds the routing table from live order-server records and operator settings.
/// Clusters appear when they have a live instance; instances are listed only when they
/// have attached nodes; everything is sorted so equal inputs give equal tables.
pub fn build_table(servers: &[OrderServerRecord], settings: &[ClusterRecord]) -> RoutingTable {
    let settings: BTreeMap<&str, &ClusterRecord> =
        settings.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut by_cluster: BTreeMap<&str, Vec<&OrderServerRecord>> = BTreeMap::new();
    for s in servers {
        by_cluster.entry(s.cluster.as_str()).or_default().push(s);
    }
    let clusters = by_cluster
        .into_iter()
        .map(|(name, mut list)| {
            list.sort_by(|a, b| a.id.cmp(&b.id));
            let mut capacity = Capacity::default();
            let mut nodes = 0;
            for s in &list {
                nodes += s.nodes;
                capacity.cpu_millis += s.capacity.cpu_millis;
                capacity.memory_mb += s.capacity.memory_mb;
                capacity.gpus += s.capacity.gpus;
                capacity.fpga_slots += s.capacity.fpga_slots;
                capacity.slots += s.capacity.slots;
            }
            let (weight, admin_state) = settings
                .get(name)
                .map(|c| (c.weight, c.admin_state))
                .unwrap_or((100, AdminState::Active));
            RoutedCluster {
                name: name.to_string(),
                weight,
                admin_state,
                capacity,
                nodes,
                order_servers: list
                    .iter()
                    .filter(|s| s.nodes > 0)
                    .map(|s| RoutedServer {
                        id: s.id.clone(),
                        addr: s.addr.clone(),
                        nodes: s.nodes,
                    })
                    .collect(),
            }
        })
        .collect();
    RoutingTable { clusters }
}

/// The cluster-scheduler's metrics, `ferry_cluster_scheduler_…`.
struct Metrics {
    registry: prometheus::Registry,
    publishes: prometheus::IntCounter,
    failures: prometheus::IntCounter,
    /// Per cluster: live order-servers and attached nodes, as last published.
    servers: prometheus::IntGaugeVec,
    nodes: prometheus::IntGaugeVec,
}

impl Metrics {
    #[allow(clippy::expect_used)] // Static metric definitions: a failure is a programming error.
    fn new() -> Self {
        use prometheus::{IntCounter, IntGaugeVec, Opts};
        let registry = prometheus::Registry::new();
        let publishes = IntCounter::new(
            "ferry_cluster_scheduler_publishes_total",
            "Routing tables written (only changes are written)",
        )
        .expect("valid metric");
        let failures = IntCounter::new(
            "ferry_cluster_scheduler_publish_failures_total",
            "Routing table writes that failed (retried)",
        )
        .expect("valid metric");
        let servers = IntGaugeVec::new(
            Opts::new(
                "ferry_cluster_scheduler_order_servers",
                "Live order-server instances per cluster",
            ),
            &["cluster"],
        )
        .expect("valid metric");
        let nodes = IntGaugeVec::new(
            Opts::new(
                "ferry_cluster_scheduler_nodes",
                "Node agents attached per cluster",
            ),
            &["cluster"],
        )
        .expect("valid metric");
        for m in [
            Box::new(publishes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(servers.clone()),
            Box::new(nodes.clone()),
        ] {
            registry.register(m).expect("metric registered once");
        }
        Self {
            registry,
            publishes,
            failures,
            servers,
            nodes,
        }
    }
}

/// A running cluster-scheduler.
pub struct Running {
    task: tokio::task::JoinHandle<()>,
    registry: prometheus::Registry,
}

impl Running {
    /// Its metrics (`ferry_cluster_scheduler_…`).
    pub fn registry(&self) -> prometheus::Registry {
        self.registry.clone()
    }

    pub fn shutdown(self) {
        self.task.abort();
    }
}

/// Starts publishing the routing table.
pub async fn start(store: Arc<dyn Store>) -> Result<Running, StoreError> {
    let servers = WatchCache::start(store.clone(), keys::ORDER_SERVERS).await?;
    let clusters = WatchCache::start(store.clone(), keys::CLUSTERS).await?;
    let metrics = Metrics::new();
    let registry = metrics.registry.clone();
    let task = tokio::spawn(async move {
        let mut a = servers.changes();
        let mut b = clusters.changes();
        loop {
            if let Err(e) = publish(store.as_ref(), &servers, &clusters, &metrics).await {
                metrics.failures.inc();
                warn!(error = %e, "cannot publish the routing table; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            tokio::select! {
                r = a.changed() => if r.is_err() { break },
                r = b.changed() => if r.is_err() { break },
            }
        }
    });
    Ok(Running { task, registry })
}

async fn publish(
    store: &dyn Store,
    servers: &WatchCache,
    clusters: &WatchCache,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    let live: Vec<OrderServerRecord> = servers
        .snapshot()
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    let settings: Vec<ClusterRecord> = clusters
        .snapshot()
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    let table = build_table(&live, &settings);
    let value = serde_json::to_vec(&table).unwrap_or_default();
    let current = store.get(keys::ROUTING).await?;
    if current.as_ref().map(|kv| &kv.value) != Some(&value) {
        store.put(keys::ROUTING, value, 0).await?;
        metrics.publishes.inc();
        metrics.servers.reset();
        metrics.nodes.reset();
        for c in &table.clusters {
            metrics
                .servers
                .with_label_values(&[c.name.as_str()])
                .set(c.order_servers.len() as i64);
            metrics
                .nodes
                .with_label_values(&[c.name.as_str()])
                .set(i64::from(c.nodes));
        }
        let summary: Vec<String> = table
            .clusters
            .iter()
            .map(|c| {
                format!(
                    "{}: {} instances, {} nodes",
                    c.name,
                    c.order_servers.len(),
                    c.nodes
                )
            })
            .collect();
        info!(clusters = ?summary, "routing table published");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str, cluster: &str, nodes: u32) -> OrderServerRecord {
        OrderServerRecord {
            id: id.into(),
            cluster: cluster.into(),
            addr: format!("http://{id}"),
            nodes,
            capacity: Capacity {
                cpu_millis: 1000 * nodes as u64,
                slots: 10 * nodes,
                ..Capacity::default()
            },
            started_ms: 0,
        }
    }

    #[test]
    fn groups_by_cluster_and_lists_only_instances_with_nodes() {
        let t = build_table(
            &[
                server("b", "east", 1),
                server("a", "east", 2),
                server("c", "east", 0),
                server("x", "west", 1),
            ],
            &[],
        );
        assert_eq!(t.clusters.len(), 2);
        let east = &t.clusters[0];
        assert_eq!(east.name, "east");
        assert_eq!(east.nodes, 3);
        assert_eq!(east.capacity.cpu_millis, 3000);
        let ids: Vec<&str> = east.order_servers.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            ["a", "b"],
            "sorted, and the idle instance c is left out"
        );
        assert_eq!(east.weight, 100);
    }

    #[test]
    fn operator_settings_apply_and_order_does_not_matter() {
        let settings = [ClusterRecord {
            name: "west".into(),
            admin_state: AdminState::Draining,
            weight: 5,
        }];
        let t1 = build_table(&[server("x", "west", 1), server("a", "east", 1)], &settings);
        let t2 = build_table(&[server("a", "east", 1), server("x", "west", 1)], &settings);
        assert_eq!(t1, t2);
        assert_eq!(t1.clusters[1].admin_state, AdminState::Draining);
        assert_eq!(t1.clusters[1].weight, 5);
    }
}
