//! Each component on its own, for a real cluster (pointed at etcd).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ferry_core::config::Env;

use crate::ServeArgs;
use crate::settings::{Settings, resolve_serve, socket_addr};

async fn open_store(s: &Settings) -> anyhow::Result<std::sync::Arc<dyn ferry_store::Store>> {
    let url = s
        .store
        .as_deref()
        .context("no store: pass --store etcd://HOST:PORT (or embedded:DIR) or set FERRY_STORE")?;
    ferry_store::open(url)
        .await
        .with_context(|| format!("open the store at {url}"))
}

pub async fn gateway(a: ServeArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let s = resolve_serve(&a, env)?;
    let store = open_store(&s).await?;
    let mut cfg = ferry_gateway::Config {
        listen: socket_addr(s.listen.as_deref().unwrap_or("127.0.0.1:7070"))?,
        public_url: s.advertise.clone(),
        token: s
            .token
            .clone()
            .context("a gateway needs a token: pass --token or set FERRY_TOKEN")?,
        data_dir: s
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".ferry")),
        callback_secret: s.callback_secret.clone(),
        ..Default::default()
    };
    if let Some(id) = s.id {
        cfg.id = id;
    }
    if let Some(secs) = env
        .parse::<u64>("FERRY_IDEMPOTENCY_WINDOW_S")
        .context("read FERRY_IDEMPOTENCY_WINDOW_S")?
    {
        cfg.idempotency_window = Duration::from_secs(secs);
    }
    if let Some(secs) = env
        .parse::<u64>("FERRY_RERUN_RETENTION_S")
        .context("read FERRY_RERUN_RETENTION_S")?
    {
        cfg.rerun_retention = Duration::from_secs(secs);
    }
    if let Some(allow) = env
        .parse::<bool>("FERRY_ALLOW_UNSIGNED_COMPAT")
        .context("read FERRY_ALLOW_UNSIGNED_COMPAT")?
    {
        cfg.allow_unsigned_compat = allow;
    }
    let running = ferry_gateway::start(cfg, store)
        .await
        .context("start the gateway")?;
    println!("gateway listening on {}", running.url);
    crate::shutdown_signal().await;
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn order_server(a: ServeArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let s = resolve_serve(&a, env)?;
    let store = open_store(&s).await?;
    let mut cfg = ferry_order_server::Config {
        listen: socket_addr(s.listen.as_deref().unwrap_or("127.0.0.1:7171"))?,
        token: s
            .token
            .clone()
            .context("an order-server needs the cluster token: pass --token or set FERRY_TOKEN")?,
        advertise: s.advertise.clone(),
        ..Default::default()
    };
    let t = crate::settings::tuning(&s)?;
    (cfg.suspect_after, cfg.dead_after, cfg.breaker) = (t.suspect_after, t.dead_after, t.breaker);
    (cfg.task_retention, cfg.callback_secret) = (t.task_retention, t.callback_secret);
    if let Some(c) = s.cluster {
        cfg.cluster = c;
    }
    if let Some(id) = s.id {
        cfg.id = id;
    }
    let running = ferry_order_server::start(cfg, store.clone())
        .await
        .context("start the order-server")?;
    println!("order-server {} listening on {}", running.id, running.url);
    let probe = crate::ops::Probe::store(store, vec![running.registry()]);
    let ops = start_ops(s.ops_listen.as_deref(), probe).await?;
    crate::shutdown_signal().await;
    stop_ops(ops);
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn order_client(a: ServeArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let s = resolve_serve(&a, env)?;
    let store = if s.store.is_some() {
        Some(open_store(&s).await?)
    } else {
        None
    };
    if store.is_none() && (s.order_servers.is_empty() || s.gateway.is_none()) {
        anyhow::bail!("a node agent needs --store, or both --order-server and --gateway");
    }
    let data_dir = s
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".ferry"));
    let node_id = match s.id.clone() {
        Some(id) => id,
        None => stable_node_id(&data_dir)?,
    };
    let mut cfg = ferry_order_client::Config::detect(node_id.clone());
    cfg.function_env = crate::settings::function_env(&s, env)?;
    let cgroup = crate::settings::cgroup(&s)?;
    if let Some(c) = s.cluster {
        cfg.cluster = c;
    }
    cfg.order_servers = s.order_servers;
    cfg.gateway = s.gateway;
    cfg.token = s.token;
    cfg.cache_dir = s
        .data_dir
        .unwrap_or_else(|| PathBuf::from(".ferry"))
        .join("cache");
    if let Some(v) = s.slots {
        cfg.capacity.slots = v;
    }
    if let Some(v) = s.cpu_millis {
        cfg.capacity.cpu_millis = v;
    }
    if let Some(v) = s.memory_mb {
        cfg.capacity.memory_mb = v;
    }
    for t in s.tags {
        if !cfg.tags.contains(&t) {
            cfg.tags.push(t);
        }
    }
    let runtime = ferry_runtime::Runtime::new(ferry_runtime::Config {
        cache_dir: cfg.cache_dir.clone(),
        cgroup,
        ..Default::default()
    })
    .context("start the runtime")?;
    let running = ferry_order_client::start(cfg, store.clone(), runtime);
    println!("node agent {node_id} started");
    let probe = match store {
        Some(store) => crate::ops::Probe::store(store, vec![running.registry()]),
        None => crate::ops::Probe::attached(running.registry()),
    };
    let ops = start_ops(s.ops_listen.as_deref(), probe).await?;
    crate::shutdown_signal().await;
    stop_ops(ops);
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn cluster_scheduler(a: ServeArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let s = resolve_serve(&a, env)?;
    let store = open_store(&s).await?;
    let running = ferry_cluster_scheduler::start(store.clone())
        .await
        .context("start the cluster-scheduler")?;
    println!("cluster-scheduler publishing the routing table");
    let probe = crate::ops::Probe::store(store, vec![running.registry()]);
    let ops = start_ops(s.ops_listen.as_deref(), probe).await?;
    crate::shutdown_signal().await;
    stop_ops(ops);
    running.shutdown();
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(ExitCode::SUCCESS)
}

/// Starts the ops endpoint when an address is configured.
async fn start_ops(
    addr: Option<&str>,
    probe: crate::ops::Probe,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let (bound, task) = crate::ops::serve(socket_addr(addr)?, probe).await?;
    println!("ops endpoint (/healthz, /readyz, /metrics) on http://{bound}");
    Ok(Some(task))
}

fn stop_ops(ops: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = ops {
        t.abort();
    }
}

/// A node keeps its id across restarts (kept in `DATA_DIR/node-id`), so the store has
/// one record per machine rather than one per process start.
fn stable_node_id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let id = default_node_id();
    std::fs::write(&path, &id).with_context(|| format!("write {}", path.display()))?;
    Ok(id)
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let suffix = &ferry_core::id::new_id()[20..];
    if host.is_empty() {
        format!("node-{suffix}")
    } else {
        format!("{host}-{suffix}")
    }
}
