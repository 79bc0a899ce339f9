//! The operations endpoint of the components that serve no HTTP of their own
//! (order-server, node agent, cluster-scheduler): `GET /healthz` (the process runs),
//! `GET /readyz` (its store answers; a node agent without a store: attached to an
//! order-server) and `GET /metrics` (Prometheus text). The gateway serves these on its
//! own port. Started with `--ops-listen ADDR` (`FERRY_OPS_LISTEN`, `ops_listen`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

type Check = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// What an endpoint reports.
#[derive(Clone)]
pub struct Probe {
    /// Whether the component can do its work now.
    pub ready: Check,
    /// The component's metrics.
    pub registries: Vec<prometheus::Registry>,
}

impl Probe {
    /// Ready while `store` answers a read within a second.
    pub fn store(
        store: Arc<dyn ferry_store::Store>,
        registries: Vec<prometheus::Registry>,
    ) -> Self {
        let ready: Check = Arc::new(move || {
            let store = store.clone();
            Box::pin(async move {
                matches!(
                    tokio::time::timeout(
                        Duration::from_secs(1),
                        store.get(ferry_core::keys::ROUTING)
                    )
                    .await,
                    Ok(Ok(_))
                )
            })
        });
        Self { ready, registries }
    }

    /// A node agent without a store: ready while attached to an order-server.
    pub fn attached(registry: prometheus::Registry) -> Self {
        let r = registry.clone();
        let ready: Check = Arc::new(move || {
            let attached = r.gather().iter().any(|f| {
                f.name() == "ferry_order_client_connected"
                    && f.get_metric()
                        .iter()
                        .any(|m| m.get_gauge().get_value() >= 1.0)
            });
            Box::pin(async move { attached })
        });
        Self {
            ready,
            registries: vec![registry],
        }
    }

    fn metrics(&self) -> String {
        use prometheus::Encoder;
        let mut families = vec![];
        for r in &self.registries {
            families.extend(r.gather());
        }
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

async fn answer(probe: &Probe, path: &str) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n", PLAIN),
        "/readyz" => {
            if (probe.ready)().await {
                text(StatusCode::OK, "ready\n", PLAIN)
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n", PLAIN)
            }
        }
        "/metrics" => text(StatusCode::OK, probe.metrics(), "text/plain; version=0.0.4"),
        _ => text(
            StatusCode::NOT_FOUND,
            "no such route: /healthz, /readyz, /metrics\n",
            PLAIN,
        ),
    }
}

/// Binds `addr` and serves until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    probe: Probe,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the ops endpoint on {addr}"))?;
    let bound = listener
        .local_addr()
        .context("read the ops endpoint's address")?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let probe = probe.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let probe = probe.clone();
                        async move {
                            let r = if req.method() == hyper::Method::GET {
                                answer(&probe, req.uri().path()).await
                            } else {
                                text(
                                    StatusCode::METHOD_NOT_ALLOWED,
                                    "GET only\n",
                                    "text/plain; charset=utf-8",
                                )
                            };
                            Ok::<_, Infallible>(r)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((bound, task))
}
