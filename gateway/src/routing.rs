//! Where a synchronous invocation goes: the routing table (published by the
//! cluster-scheduler, watched here) picks a cluster by weight and an order-server in
//! it round-robin; one gRPC channel per order-server is kept and multiplexed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ferry_core::model::{AdminState, RoutedServer, RoutingTable};
use ferry_core::proto::{FunctionSpec, InvokeReply, InvokeRequest, order_client::OrderClient};
use ferry_core::{Error, ErrorCode};
use rand::Rng;
use tonic::transport::Channel;

pub struct Router {
    /// `Bearer TOKEN` for the order-servers.
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    table: RwLock<Arc<RoutingTable>>,
    clients: Mutex<HashMap<String, OrderClient<Channel>>>,
    next: AtomicUsize,
}

/// Extra time the gateway waits past an order-server's own deadline, so the
/// order-server always answers (or cancels) first.
const DEADLINE_MARGIN: Duration = Duration::from_secs(5);

impl Router {
    pub fn new(token: &str) -> Result<Self, Error> {
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::new(ErrorCode::BadRequest, "the token must be printable ASCII"))?;
        Ok(Self {
            bearer,
            table: RwLock::default(),
            clients: Mutex::default(),
            next: AtomicUsize::new(0),
        })
    }

    pub fn set_table(&self, table: RoutingTable) {
        // Forget channels to instances that left the table.
        let live: std::collections::HashSet<&str> = table
            .clusters
            .iter()
            .flat_map(|c| c.order_servers.iter().map(|s| s.addr.as_str()))
            .collect();
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|addr, _| live.contains(addr.as_str()));
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Order-servers to try, best first: one active cluster chosen by weight, its
    /// instances (those with nodes) in round-robin order.
    fn candidates(&self) -> Vec<RoutedServer> {
        let table = self.table();
        let live: Vec<_> = table
            .clusters
            .iter()
            .filter(|c| {
                c.admin_state == AdminState::Active && c.weight > 0 && !c.order_servers.is_empty()
            })
            .collect();
        let total: u32 = live.iter().map(|c| c.weight).sum();
        if total == 0 {
            return vec![];
        }
        let mut pick = rand::rng().random_range(0..total);
        let cluster = live.iter().find(|c| {
            if pick < c.weight {
                true
            } else {
                pick -= c.weight;
                false
            }
        });
        let Some(cluster) = cluster else {
            return vec![];
        };
        let n = cluster.order_servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| cluster.order_servers[(start + i) % n].clone())
            .collect()
    }

    /// The cluster a new async task is queued in: an active one, by weight, preferring
    /// clusters that have nodes now. `None` when no cluster is known at all.
    pub fn pick_cluster(&self) -> Option<String> {
        let table = self.table();
        let active: Vec<_> = table
            .clusters
            .iter()
            .filter(|c| c.admin_state == AdminState::Active && c.weight > 0)
            .collect();
        let with_nodes: Vec<_> = active.iter().copied().filter(|c| c.nodes > 0).collect();
        let pool = if with_nodes.is_empty() {
            active
        } else {
            with_nodes
        };
        let total: u32 = pool.iter().map(|c| c.weight).sum();
        if total == 0 {
            return None;
        }
        let mut pick = rand::rng().random_range(0..total);
        pool.iter()
            .find(|c| {
                if pick < c.weight {
                    true
                } else {
                    pick -= c.weight;
                    false
                }
            })
            .map(|c| c.name.clone())
    }

    fn client(&self, addr: &str) -> Result<OrderClient<Channel>, Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(addr.to_string())
            .map_err(|e| Error::internal(format!("bad order-server address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let client = OrderClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(ferry_core::MAX_GRPC_MESSAGE)
            .max_encoding_message_size(ferry_core::MAX_GRPC_MESSAGE);
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// The live state of every node, asked of every order-server in the table at once
    /// (an instance that does not answer within `timeout` is skipped): (cluster,
    /// order-server id, node).
    pub async fn live_nodes(
        &self,
        timeout: Duration,
    ) -> Vec<(String, String, ferry_core::proto::NodeStatus)> {
        let table = self.table();
        let mut calls = vec![];
        for c in &table.clusters {
            for s in &c.order_servers {
                let Ok(mut client) = self.client(&s.addr) else {
                    continue;
                };
                let mut req = tonic::Request::new(ferry_core::proto::NodesRequest {});
                req.set_timeout(timeout);
                req.metadata_mut()
                    .insert(ferry_core::AUTH_METADATA, self.bearer.clone());
                let cluster = c.name.clone();
                calls.push(async move {
                    match tokio::time::timeout(timeout, client.nodes(req)).await {
                        Ok(Ok(r)) => {
                            let r = r.into_inner();
                            r.nodes
                                .into_iter()
                                .map(|n| (cluster.clone(), r.server_id.clone(), n))
                                .collect()
                        }
                        _ => vec![],
                    }
                });
            }
        }
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Runs a synchronous invocation on some order-server, trying the next one when an
    /// instance is unreachable or has no room.
    pub async fn invoke(
        &self,
        spec: FunctionSpec,
        input: bytes::Bytes,
        request_id: &str,
        grace: Duration,
        env: Vec<ferry_core::proto::EnvVar>,
    ) -> Result<InvokeReply, Error> {
        let candidates = self.candidates();
        if candidates.is_empty() {
            return Err(Error::new(
                ErrorCode::NoCapacity,
                "no cluster has an order-server with attached nodes",
            ));
        }
        let timeout = Duration::from_millis(spec.timeout_ms) + grace + DEADLINE_MARGIN;
        let msg = InvokeRequest {
            request_id: request_id.to_string(),
            function: Some(spec),
            input: input.to_vec(),
            env,
        };
        let mut last = None;
        for server in candidates.iter().take(3) {
            let mut client = self.client(&server.addr)?;
            let mut req = tonic::Request::new(msg.clone());
            req.set_timeout(timeout);
            req.metadata_mut()
                .insert(ferry_core::AUTH_METADATA, self.bearer.clone());
            match client.invoke(req).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(status) => {
                    let e = Error::from_status(&status);
                    // Only when the function certainly did not run: the instance said it
                    // had no room, or we never reached it. Anything else may have run.
                    let explicit = status
                        .metadata()
                        .get(ferry_core::error::GRPC_CODE_KEY)
                        .is_some();
                    let not_delivered = !explicit
                        && status.code() == tonic::Code::Unavailable
                        && status.message().to_ascii_lowercase().contains("connect");
                    if (explicit && e.code == ErrorCode::NoCapacity) || not_delivered {
                        tracing::debug!(order_server = %server.id, error = %e, "trying the next order-server");
                        last = Some(e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::new(
                ErrorCode::NoCapacity,
                "no order-server could take the invocation",
            )
        }))
    }
}
