//! The HTTP front door.
//!
//! Authenticates every `/v1` call, accepts packages (validated, content-addressed,
//! versioned immutably), and routes synchronous invocations to an order-server chosen
//! from the routing table. Stateless: everything it holds in memory is a cache of the
//! store, rebuilt by watches, so any replica can serve any request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::keys;
use ferry_core::model::{GatewayRecord, RoutingTable};
use ferry_store::{LeaseKeeper, Store, StoreError, WatchCache};
use tracing::{info, warn};

mod aliases;
mod api;
pub mod blobs;
mod catalog;
pub mod error;
mod idempotency;
mod lambda;
mod limits;
mod metrics;
mod nodes;
pub mod openapi;
mod openfaas;
mod queues;
mod reruns;
mod routing;
mod sigv4;
pub mod sweep;
mod task_list;
pub use task_list::backfill as index_older_tasks;
mod tasks;
mod tenancy;

pub use api::served_paths;

/// A gateway's settings. (No `Debug`: it holds the token.)
#[derive(Clone)]
pub struct Config {
    pub id: String,
    pub listen: SocketAddr,
    /// The URL node agents fetch packages from; defaults to `http://<bound address>`.
    pub public_url: Option<String>,
    /// Bearer token every `/v1` call must carry.
    pub token: String,
    /// Packages live under `DATA_DIR/blobs`.
    pub data_dir: PathBuf,
    /// Largest invocation body.
    pub max_body: usize,
    /// Largest package upload (compressed).
    pub max_package: usize,
    /// Largest unpacked package.
    pub max_unpacked: u64,
    /// Time allowed on top of a function's own timeout (queueing, fetch, compile).
    pub invoke_grace: Duration,
    /// How long an `Idempotency-Key` answers with its first call's task or result;
    /// entries older than this are removed.
    pub idempotency_window: Duration,
    /// How long a batch re-run's record is kept (its tasks follow task retention).
    pub rerun_retention: Duration,
    /// Accept unsigned requests on the compatibility paths (Lambda, OpenFaaS), acting
    /// with the admin scope. Only for a gateway no untrusted caller can reach.
    pub allow_unsigned_compat: bool,
    /// The operator's callback secret (the order-servers'), from which each tenant's
    /// own is derived: `GET /v1/callback-secret` hands callers theirs.
    pub callback_secret: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: ferry_core::id::new_id(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            public_url: None,
            token: String::new(),
            data_dir: PathBuf::from(".ferry"),
            max_body: 6 << 20,
            max_package: 256 << 20,
            max_unpacked: 1 << 30,
            invoke_grace: Duration::from_secs(30),
            idempotency_window: Duration::from_secs(24 * 3600),
            rerun_retention: Duration::from_secs(7 * 24 * 3600),
            allow_unsigned_compat: false,
            callback_secret: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("a gateway needs a token (--token or FERRY_TOKEN)")]
    NoToken,
    #[error("bad token: {0}")]
    BadToken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything a request handler can reach.
pub(crate) struct AppState {
    pub cfg: Config,
    pub store: Arc<dyn Store>,
    pub catalog: Arc<catalog::Catalog>,
    pub directory: Arc<tenancy::Directory>,
    pub limiter: Arc<limits::Limiter>,
    pub queues: queues::Queues,
    pub router: routing::Router,
    pub blobs: blobs::Blobs,
    pub metrics: metrics::Metrics,
}

/// A running gateway.
pub struct Running {
    pub addr: SocketAddr,
    pub url: String,
    store: Arc<dyn Store>,
    /// The registration lease, revoked on shutdown so nodes stop fetching from here.
    lease: Arc<std::sync::Mutex<Option<ferry_store::LeaseId>>>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(lease) = lease {
            let _ = self.store.revoke_lease(lease).await;
        }
        let _ = self.shutdown.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), self.server).await;
    }
}

/// Binds, loads its caches from the store, registers, and serves.
pub async fn start(cfg: Config, store: Arc<dyn Store>) -> Result<Running, GatewayError> {
    if cfg.token.is_empty() {
        return Err(GatewayError::NoToken);
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let url = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let catalog = catalog::Catalog::start(store.clone()).await?;
    let state = Arc::new(AppState {
        blobs: blobs::Blobs::new(cfg.data_dir.join("blobs")),
        cfg: cfg.clone(),
        store: store.clone(),
        catalog,
        directory: tenancy::Directory::start(store.clone()).await?,
        limiter: Arc::default(),
        queues: queues::Queues::start(store.clone()).await?,
        router: routing::Router::new(&cfg.token).map_err(|e| GatewayError::BadToken(e.message))?,
        metrics: metrics::Metrics::new(),
    });
    let mut tasks = vec![];

    // Index tasks from before the listing index (once per store).
    let st = store.clone();
    tasks.push(tokio::spawn(async move {
        match task_list::backfill(&st).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tasks = n, "indexed tasks written before the listing index"),
            Err(e) => {
                warn!(error = %e, "indexing older tasks failed; they are left out of listings")
            }
        }
    }));

    // Forget idempotency keys and re-runs past their windows.
    let every = (cfg.idempotency_window.min(cfg.rerun_retention) / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(600));
    tasks.push(tokio::spawn(sweep::run(
        store.clone(),
        cfg.idempotency_window,
        cfg.rerun_retention,
        every,
    )));

    // Follow the routing table.
    let routing = WatchCache::start(store.clone(), keys::ROUTING).await?;
    let st = state.clone();
    tasks.push(tokio::spawn(async move {
        let mut changes = routing.changes();
        loop {
            let table = routing
                .get(keys::ROUTING)
                .and_then(|kv| serde_json::from_slice::<RoutingTable>(&kv.value).ok())
                .unwrap_or_default();
            st.router.set_table(table);
            if changes.changed().await.is_err() {
                return;
            }
        }
    }));

    // Announce ourselves (node agents find packages here), under a lease.
    let record = serde_json::to_vec(&GatewayRecord {
        id: cfg.id.clone(),
        url: url.clone(),
    })
    .unwrap_or_default();
    let key = keys::gateway(&cfg.id);
    let st = store.clone();
    let lease_slot: Arc<std::sync::Mutex<Option<ferry_store::LeaseId>>> = Arc::default();
    let slot = lease_slot.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            match LeaseKeeper::start(st.clone(), Duration::from_secs(10)).await {
                Ok(lease) => {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease.id());
                    if let Err(e) = st.put(&key, record.clone(), lease.id()).await {
                        warn!(error = %e, "gateway registration failed");
                    } else {
                        lease.lost().await;
                        warn!("gateway lease lost; registering again");
                    }
                }
                Err(e) => warn!(error = %e, "gateway lease failed"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }));

    let app = api::router(state);
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        // Small responses must not wait on Nagle + delayed ACK (a 40 ms stall).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stop.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "gateway stopped serving");
        }
    });
    info!(%url, "gateway listening");
    Ok(Running {
        addr,
        url,
        store,
        lease: lease_slot,
        shutdown,
        server,
        tasks,
    })
}
