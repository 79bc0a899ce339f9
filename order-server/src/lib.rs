//! The per-cluster central scheduler (order-server).
//!
//! Stateless and multi-instance: node agents attach to any instance over one gRPC
//! stream, and an instance places work only on the nodes attached to it, so each node's
//! capacity has exactly one owner. Heartbeats stay in memory; only transitions (node
//! attached, node dead) are written to the store. The placement decision itself is the
//! pure function in [`placement`]; this crate's other modules are the I/O shell.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_store::Store;

mod batcher;
pub mod breaker;
pub mod fairness;
mod housekeeping;
mod metrics;
pub mod placement;
mod queue_index;
mod registry;
mod service;
mod tasks;

pub use breaker::BreakerConfig;
pub use service::OrderService;

/// An order-server instance's settings.
/// (No `Debug`: it holds the token and the callback secret.)
#[derive(Clone)]
pub struct Config {
    /// Instance id; unique per process. Defaults to a fresh random id.
    pub id: String,
    pub cluster: String,
    /// gRPC listen address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The cluster credential: gateways and node agents present `Bearer TOKEN`.
    pub token: String,
    /// Address other components dial, when it differs from the bound one.
    pub advertise: Option<String>,
    /// Interval node agents are told to heartbeat at.
    pub heartbeat: Duration,
    /// Silence after which a node gets no new work (suspect).
    pub suspect_after: Duration,
    /// Silence after which a node is dead and its work fails over.
    pub dead_after: Duration,
    /// Circuit-breaker thresholds (per node and per node × function).
    pub breaker: BreakerConfig,
    /// TTL of the instance's registration lease.
    pub lease_ttl: Duration,
    /// Time allowed on top of a function's timeout for fetching and compiling.
    pub assignment_grace: Duration,
    /// A queued task that waited this long may be claimed by any instance, not only
    /// the one its id hashes to.
    pub steal_after: Duration,
    /// How often running tasks of vanished instances are looked for.
    pub orphan_sweep: Duration,
    /// Finished tasks are removed this long after they finished.
    pub task_retention: Duration,
    /// Key of the HMAC-SHA256 signature on task callbacks (`X-Ferry-Signature`);
    /// without one, callbacks go unsigned.
    pub callback_secret: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: ferry_core::id::new_id(),
            cluster: "local".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7171)),
            token: String::new(),
            advertise: None,
            heartbeat: Duration::from_secs(1),
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
            lease_ttl: Duration::from_secs(10),
            assignment_grace: Duration::from_secs(30),
            steal_after: Duration::from_secs(2),
            orphan_sweep: Duration::from_secs(1),
            task_retention: Duration::from_secs(7 * 24 * 3600),
            callback_secret: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OrderServerError {
    #[error("an order-server needs the cluster token (--token or FERRY_TOKEN)")]
    NoToken,
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
}

/// A running instance. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub id: String,
    pub addr: SocketAddr,
    /// The URL other components dial (`http://host:port`).
    pub url: String,
    service: OrderService,
    shutdown: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Its metrics (`ferry_order_server_…`, labelled with the instance id), read from
    /// its live state when gathered.
    pub fn registry(&self) -> prometheus::Registry {
        metrics::registry(&self.service)
    }

    /// Detaches every node, withdraws the registration and stops serving.
    pub async fn shutdown(self) {
        self.service.close().await;
        let _ = self.shutdown.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), self.server).await;
    }
}

/// Binds, registers in the store and serves until [`Running::shutdown`].
pub async fn start(cfg: Config, store: Arc<dyn Store>) -> Result<Running, OrderServerError> {
    if cfg.token.is_empty() {
        return Err(OrderServerError::NoToken);
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| OrderServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| OrderServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let url = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let service = OrderService::start(cfg.clone(), url.clone(), store).await?;
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let svc = ferry_core::proto::order_server::OrderServer::new(service.clone())
        .max_decoding_message_size(ferry_core::MAX_GRPC_MESSAGE)
        .max_encoding_message_size(ferry_core::MAX_GRPC_MESSAGE);
    let expected = format!("Bearer {}", cfg.token);
    let authenticate = move |req: tonic::Request<()>| {
        let presented = req
            .metadata()
            .get(ferry_core::AUTH_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ferry_core::id::constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            Ok(req)
        } else {
            Err(ferry_core::Error::new(
                ferry_core::ErrorCode::Unauthorized,
                "missing or invalid cluster credential",
            )
            .to_status())
        }
    };
    let svc = tonic::service::interceptor::InterceptedService::new(svc, authenticate);
    let server = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "order-server stopped serving");
        }
    });
    tracing::info!(id = %cfg.id, cluster = %cfg.cluster, %url, "order-server listening");
    Ok(Running {
        id: cfg.id,
        addr,
        url,
        service,
        shutdown,
        server,
    })
}
