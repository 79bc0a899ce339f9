//! The node agent (order-client).
//!
//! Registers the node's resources with one order-server instance over a single gRPC
//! stream, heartbeats on it, accepts or rejects each assignment against its own free
//! capacity (the node is the truth about itself), fetches packages from a gateway by
//! content hash into the runtime's cache, runs them, and reports results. When its
//! instance goes away it reconnects to another; running functions are not interrupted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::model::{Capacity, GatewayRecord, OrderServerRecord};
use ferry_core::package::Limits;
use ferry_core::proto::{
    self, Accept, Heartbeat, NodeMessage, Outcome, Register, Reject, ServerMessage, TaskResult,
    node_message, server_message,
};
pub mod gpu;
mod metrics;

use ferry_core::{Error, ErrorCode, keys};
use ferry_runtime::Runtime;
use ferry_store::Store;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

/// A node agent's settings. (No `Debug`: it holds the token.)
#[derive(Clone)]
pub struct Config {
    pub node_id: String,
    pub cluster: String,
    /// Order-server URLs to attach to; empty: discover them in the store.
    pub order_servers: Vec<String>,
    /// Gateway URL to fetch packages from; `None`: discover one in the store.
    pub gateway: Option<String>,
    /// Bearer token for package fetches.
    pub token: Option<String>,
    pub cache_dir: PathBuf,
    pub capacity: Capacity,
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Longest pause between reconnection attempts.
    pub reconnect_max: Duration,
    /// Environment variables given to every native function this node runs (set by the
    /// operator, e.g. `FERRY_API_URL` and `FERRY_API_TOKEN` for functions that submit
    /// tasks of their own).
    pub function_env: Vec<(String, String)>,
    /// GPU indices tasks may be given (filled by [`Config::detect`] from NVML); empty:
    /// `0..capacity.gpus`.
    pub gpu_indices: Vec<u32>,
}

impl Config {
    /// Settings for this machine: its CPUs and memory, tagged `cpu`, and the GPUs NVML
    /// finds (tagged `gpu`, plus `nvenc`/`nvdec` when every GPU has one).
    pub fn detect(node_id: impl Into<String>) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let (gpus, why_none) = gpu::discover();
        match &why_none {
            Some(why) => debug!(%why, "no GPUs"),
            None => info!(gpus = gpus.len(), "GPUs found through NVML"),
        }
        let (gpu_tags, gpu_labels) = gpu::tags_and_labels(&gpus);
        let mut tags = vec!["cpu".to_string()];
        tags.extend(gpu_tags);
        Self {
            node_id: node_id.into(),
            cluster: "local".into(),
            order_servers: vec![],
            gateway: None,
            token: None,
            cache_dir: PathBuf::from(".ferry/cache"),
            capacity: Capacity {
                cpu_millis: cpus * 1000,
                memory_mb: memory_mb(),
                gpus: gpus.len() as u32,
                fpga_slots: 0,
                slots: 64,
            },
            tags,
            labels: gpu_labels.into_iter().collect(),
            reconnect_max: Duration::from_secs(2),
            function_env: vec![],
            gpu_indices: gpus.iter().map(|g| g.index).collect(),
        }
    }
}

/// Total memory from /proc/meminfo (4 GiB when it cannot be read).
fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(4096)
}

/// A running agent.
pub struct Running {
    pub node_id: String,
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
    metrics: prometheus::Registry,
}

impl Running {
    /// The agent's metrics (`ferry_order_client_…`, labelled with the node id).
    pub fn registry(&self) -> prometheus::Registry {
        self.metrics.clone()
    }

    /// Closes the stream and stops; running functions are abandoned.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.join).await;
    }
}

/// Starts the agent's connection loop.
pub fn start(cfg: Config, store: Option<Arc<dyn Store>>, runtime: Runtime) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let node_id = cfg.node_id.clone();
    // The GPUs tasks may be given: those discovered, or 0..n when configured by hand.
    let gpu_indices: Vec<u32> = if cfg.gpu_indices.is_empty() {
        (0..cfg.capacity.gpus).collect()
    } else {
        cfg.gpu_indices.clone()
    };
    let agent = Agent {
        inner: Arc::new(Inner {
            cfg,
            store,
            runtime,
            http: reqwest::Client::new(),
            outbound: Mutex::new(None),
            undelivered: Mutex::new(Vec::new()),
            used: Mutex::new(Capacity::default()),
            gpus: Mutex::new(gpu::GpuPool::new(gpu_indices)),
            gpu_held: Mutex::new(HashMap::new()),
            preparing: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            metrics: metrics::Metrics::new(&node_id),
        }),
    };
    let metrics = agent.inner.metrics.registry.clone();
    let span = info_span!("node", node_id = %node_id);
    let join = tokio::spawn(agent.run(stop_rx).instrument(span));
    Running {
        node_id,
        stop,
        join,
        metrics,
    }
}

#[derive(Clone)]
struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    store: Option<Arc<dyn Store>>,
    runtime: Runtime,
    http: reqwest::Client,
    /// The current stream's sender; `None` while disconnected.
    outbound: Mutex<Option<mpsc::Sender<NodeMessage>>>,
    /// Results finished while disconnected, sent on the next stream.
    undelivered: Mutex<Vec<NodeMessage>>,
    /// Resources reserved by accepted tasks.
    used: Mutex<Capacity>,
    /// GPU indices not given to a task, and which task holds which.
    gpus: Mutex<gpu::GpuPool>,
    gpu_held: Mutex<HashMap<String, Vec<u32>>>,
    /// One preparation at a time per package.
    preparing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Tasks running here: whoever removes an entry (the task when it ends, or a
    /// cancellation) releases its reservation and reports its result, exactly once.
    running: Mutex<HashMap<String, (futures::future::AbortHandle, Capacity, u32)>>,
    metrics: metrics::Metrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const MAX_UNDELIVERED: usize = 10_000;

impl Agent {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        // Start at a node-specific instance so nodes spread over instances.
        let mut next = self
            .inner
            .cfg
            .node_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        while !*stop.borrow() {
            let servers = self.discover_servers().await;
            if servers.is_empty() {
                debug!("no order-server to attach to yet");
            } else {
                let url = &servers[next % servers.len()];
                let attached_at = Instant::now();
                match self.session(url, &mut stop).await {
                    Ok(()) => {}
                    Err(e) => warn!(order_server = %url, error = %e, "order-server stream ended"),
                }
                if attached_at.elapsed() > Duration::from_secs(5) {
                    backoff = Duration::from_millis(100);
                }
                next = next.wrapping_add(1);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => {}
            }
            backoff = (backoff * 2).min(self.inner.cfg.reconnect_max);
        }
        *lock(&self.inner.outbound) = None;
    }

    async fn discover_servers(&self) -> Vec<String> {
        if !self.inner.cfg.order_servers.is_empty() {
            return self.inner.cfg.order_servers.clone();
        }
        let Some(store) = &self.inner.store else {
            return vec![];
        };
        match store
            .range(&keys::order_servers_of(&self.inner.cfg.cluster))
            .await
        {
            Ok(r) => r
                .kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice::<OrderServerRecord>(&kv.value).ok())
                .map(|r| r.addr)
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list order-servers");
                vec![]
            }
        }
    }

    fn register_message(&self) -> NodeMessage {
        let c = &self.inner.cfg;
        NodeMessage {
            msg: Some(node_message::Msg::Register(Register {
                node_id: c.node_id.clone(),
                capacity: Some(c.capacity.into()),
                labels: c.labels.clone().into_iter().collect(),
                tags: c.tags.clone(),
                cached_packages: self.inner.runtime.cached_packages(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            })),
        }
    }

    /// One attachment: register, heartbeat, serve assignments until the stream ends.
    async fn session(&self, url: &str, stop: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let unavailable =
            |e: &dyn std::fmt::Display| Error::new(ErrorCode::Unavailable, format!("{url}: {e}"));
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| unavailable(&e))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| unavailable(&e))?;
        let mut client = proto::order_client::OrderClient::new(channel)
            .max_decoding_message_size(ferry_core::MAX_GRPC_MESSAGE)
            .max_encoding_message_size(ferry_core::MAX_GRPC_MESSAGE);
        let (tx, rx) = mpsc::channel::<NodeMessage>(1024);
        let _ = tx.send(self.register_message()).await;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(t) = &self.inner.cfg.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            request.metadata_mut().insert(ferry_core::AUTH_METADATA, v);
        }
        let mut inbound = client
            .attach(request)
            .await
            .map_err(|s| Error::from_status(&s))?
            .into_inner();
        let registered = match inbound
            .message()
            .await
            .map_err(|s| Error::from_status(&s))?
        {
            Some(ServerMessage {
                msg: Some(server_message::Msg::Registered(r)),
            }) => r,
            _ => {
                return Err(Error::new(
                    ErrorCode::Unavailable,
                    "order-server did not confirm registration",
                ));
            }
        };
        info!(order_server = %registered.server_id, %url, "attached");
        *lock(&self.inner.outbound) = Some(tx.clone());
        self.inner.metrics.connected.set(1);
        let backlog = std::mem::take(&mut *lock(&self.inner.undelivered));
        for msg in backlog {
            let _ = tx.send(msg).await;
        }
        let heartbeat = tokio::spawn(self.clone().heartbeat_loop(
            tx,
            Duration::from_millis(registered.heartbeat_ms.max(50) as u64),
        ));
        let result = loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => self.handle(m),
                    Ok(None) => break Ok(()),
                    Err(s) => break Err(Error::from_status(&s)),
                },
                _ = stop.changed() => break Ok(()),
            }
        };
        heartbeat.abort();
        *lock(&self.inner.outbound) = None;
        self.inner.metrics.connected.set(0);
        result
    }

    async fn heartbeat_loop(self, tx: mpsc::Sender<NodeMessage>, every: Duration) {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            seq += 1;
            let used = *lock(&self.inner.used);
            let msg = NodeMessage {
                msg: Some(node_message::Msg::Heartbeat(Heartbeat {
                    seq,
                    used: Some(used.into()),
                    running: used.slots,
                })),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }

    /// Sends on the current stream (waiting in a task if it is momentarily full), or
    /// keeps the message for the next stream while disconnected.
    /// Sends now if connected; otherwise drops the message.
    fn send_lossy(&self, msg: NodeMessage) {
        if let Some(tx) = lock(&self.inner.outbound).clone() {
            let _ = tx.try_send(msg);
        }
    }

    fn send(&self, msg: NodeMessage) {
        let tx = lock(&self.inner.outbound).clone();
        let msg = match tx {
            Some(tx) => match tx.try_send(msg) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(m)) => {
                    tokio::spawn(async move {
                        let _ = tx.send(m).await;
                    });
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(m)) => m,
            },
            None => msg,
        };
        let mut pending = lock(&self.inner.undelivered);
        if pending.len() < MAX_UNDELIVERED {
            pending.push(msg);
        }
    }

    fn handle(&self, msg: ServerMessage) {
        match msg.msg {
            Some(server_message::Msg::Assignment(a)) => self.assign(a),
            Some(server_message::Msg::Cancel(c)) => {
                let entry = {
                    let mut running = lock(&self.inner.running);
                    let entry = running.remove(&c.task_id);
                    self.inner.metrics.running.set(running.len() as i64);
                    entry
                };
                if let Some((abort, need, attempt)) = entry {
                    info!(task_id = %c.task_id, "cancelling");
                    abort.abort();
                    self.release_gpus(&c.task_id);
                    self.release(&need);
                    let result = TaskResult {
                        task_id: c.task_id,
                        attempt,
                        outcome: Outcome::Cancelled as i32,
                        error: "cancelled".into(),
                        error_code: ErrorCode::Unavailable.as_str().into(),
                        ..TaskResult::default()
                    };
                    self.send(NodeMessage {
                        msg: Some(node_message::Msg::Result(result)),
                    });
                }
            }
            Some(server_message::Msg::Prefetch(p)) => {
                if let Some(spec) = p.function {
                    let agent = self.clone();
                    tokio::spawn(async move {
                        match agent.ensure_package(&spec).await {
                            Ok(_) => {
                                debug!(function = %spec.name, version = spec.version, "prefetched")
                            }
                            Err(e) => debug!(function = %spec.name, error = %e, "prefetch failed"),
                        }
                    });
                }
            }
            Some(server_message::Msg::Registered(_)) | None => {}
        }
    }

    /// Reserves the task's needs if they fit what this node has left.
    fn reserve(&self, need: &Capacity) -> bool {
        let cap = self.inner.cfg.capacity;
        let mut used = lock(&self.inner.used);
        let fits = used.slots < cap.slots
            && used.cpu_millis + need.cpu_millis <= cap.cpu_millis
            && used.memory_mb + need.memory_mb <= cap.memory_mb
            && used.gpus + need.gpus <= cap.gpus;
        if fits {
            used.slots += 1;
            used.cpu_millis += need.cpu_millis;
            used.memory_mb += need.memory_mb;
            used.gpus += need.gpus;
        }
        fits
    }

    /// Gives back a task's GPUs (if it held any).
    fn release_gpus(&self, task_id: &str) {
        if let Some(ids) = lock(&self.inner.gpu_held).remove(task_id) {
            lock(&self.inner.gpus).give_back(&ids);
        }
    }

    fn release(&self, need: &Capacity) {
        let mut used = lock(&self.inner.used);
        used.slots = used.slots.saturating_sub(1);
        used.cpu_millis = used.cpu_millis.saturating_sub(need.cpu_millis);
        used.memory_mb = used.memory_mb.saturating_sub(need.memory_mb);
        used.gpus = used.gpus.saturating_sub(need.gpus);
    }

    fn refuse(&self, a: &proto::Assignment, kind: &str, reason: &str) {
        self.inner
            .metrics
            .rejections
            .with_label_values(&[kind])
            .inc();
        self.send(reject(a, reason));
    }

    fn assign(&self, a: proto::Assignment) {
        let Some(spec) = a.function.clone() else {
            self.refuse(&a, "invalid", "assignment without a function");
            return;
        };
        let need = Capacity {
            cpu_millis: spec.cpu_millis,
            memory_mb: spec.memory_mb,
            gpus: spec.gpus,
            fpga_slots: spec.fpga_slots,
            slots: 1,
        };
        if !self.reserve(&need) {
            self.refuse(&a, "capacity", "over capacity");
            return;
        }
        if need.gpus > 0 {
            match lock(&self.inner.gpus).take(need.gpus) {
                Some(ids) => {
                    lock(&self.inner.gpu_held).insert(a.task_id.clone(), ids);
                }
                None => {
                    self.release(&need);
                    self.refuse(&a, "gpu", "no free GPU");
                    return;
                }
            }
        }
        self.send(NodeMessage {
            msg: Some(node_message::Msg::Accept(Accept {
                task_id: a.task_id.clone(),
                attempt: a.attempt,
            })),
        });
        let agent = self.clone();
        let span = info_span!("task", function = %spec.name, task_id = %a.task_id, attempt = a.attempt, request_id = %a.request_id);
        let (abort, registration) = futures::future::AbortHandle::new_pair();
        {
            let mut running = lock(&self.inner.running);
            running.insert(a.task_id.clone(), (abort, need, a.attempt));
            self.inner.metrics.running.set(running.len() as i64);
        }
        let run = async move {
            let result = agent.run_task(a, spec).await;
            agent.inner.metrics.finished(&result);
            let mine = {
                let mut running = lock(&agent.inner.running);
                let mine = running.remove(&result.task_id).is_some();
                agent.inner.metrics.running.set(running.len() as i64);
                mine
            };
            if mine {
                agent.release(&need);
                agent.release_gpus(&result.task_id);
                agent.send(NodeMessage {
                    msg: Some(node_message::Msg::Result(result)),
                });
            }
        };
        tokio::spawn(futures::future::Abortable::new(run, registration).instrument(span));
    }

    async fn run_task(&self, a: proto::Assignment, spec: proto::FunctionSpec) -> TaskResult {
        let started = Instant::now();
        let mut result = TaskResult {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            ..TaskResult::default()
        };
        let cold = match self.ensure_package(&spec).await {
            Ok(cold) => cold,
            Err(e) => {
                warn!(error = %e, "cannot prepare package");
                result.set_outcome(Outcome::Failed);
                result.error = e.message;
                result.error_code = e.code.as_str().into();
                result.duration_us = started.elapsed().as_micros() as u64;
                return result;
            }
        };
        result.cold = cold;
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel();
        let req = ferry_runtime::Request {
            input: a.input,
            limits: Limits {
                memory_mb: spec.memory_mb,
                timeout_ms: spec.timeout_ms,
                cpu_millis: spec.cpu_millis,
            },
            function: spec.name.clone(),
            version: spec.version,
            request_id: a.request_id,
            progress: Some(progress_tx),
            env: {
                // The operator's environment, then exactly the GPUs this task holds.
                let held = lock(&self.inner.gpu_held)
                    .get(&a.task_id)
                    .cloned()
                    .unwrap_or_default();
                let mut env = self.inner.cfg.function_env.clone();
                env.retain(|(k, _)| k != "CUDA_VISIBLE_DEVICES" && k != "NVIDIA_VISIBLE_DEVICES");
                env.extend(gpu::visibility_env(&held));
                env.extend(request_env(a.env));
                env
            },
        };
        // Progress goes to the order-server as it comes (dropped while disconnected:
        // only the latest matters, and the result follows anyway).
        let agent = self.clone();
        let (task_id, attempt) = (a.task_id.clone(), a.attempt);
        let forward = tokio::spawn(async move {
            while let Some(p) = progress_rx.recv().await {
                agent.send_lossy(NodeMessage {
                    msg: Some(node_message::Msg::Progress(proto::Progress {
                        task_id: task_id.clone(),
                        attempt,
                        percent: p.percent,
                        message: p.message,
                    })),
                });
            }
        });
        let invoked = self.inner.runtime.invoke(&spec.package_sha256, req).await;
        // The runtime drops its sender when the process ends; never wait long for it.
        let _ = tokio::time::timeout(Duration::from_secs(1), forward).await;
        match invoked {
            Ok(inv) => {
                result.log_tail = inv.log_tail;
                match inv.outcome {
                    ferry_runtime::Outcome::Succeeded(out) => {
                        result.set_outcome(Outcome::Succeeded);
                        result.output = out;
                    }
                    ferry_runtime::Outcome::FunctionError(msg) => {
                        result.set_outcome(Outcome::FunctionError);
                        result.error = msg;
                        result.error_code = ErrorCode::FunctionError.as_str().into();
                    }
                    ferry_runtime::Outcome::TimedOut => {
                        result.set_outcome(Outcome::TimedOut);
                        result.error = format!("timed out after {} ms", spec.timeout_ms);
                        result.error_code = ErrorCode::Timeout.as_str().into();
                    }
                    ferry_runtime::Outcome::Failed(msg) => {
                        result.set_outcome(Outcome::Failed);
                        result.error = msg;
                        result.error_code = ErrorCode::Internal.as_str().into();
                    }
                }
            }
            Err(e) => {
                let e = Error::from(e);
                result.set_outcome(Outcome::Failed);
                result.error = e.message;
                result.error_code = e.code.as_str().into();
            }
        }
        result.duration_us = started.elapsed().as_micros() as u64;
        result
    }

    /// Makes the package runnable: memory, then the disk cache, then a fetch from a
    /// gateway (verified by hash in the runtime). Returns whether this was a cold start.
    async fn ensure_package(&self, spec: &proto::FunctionSpec) -> Result<bool, Error> {
        let sha = spec.package_sha256.clone();
        if !ferry_core::id::valid_sha256(&sha) {
            return Err(Error::new(
                ErrorCode::BadRequest,
                format!("invalid package hash {sha:?}"),
            ));
        }
        if self.inner.runtime.is_prepared(&sha) {
            return Ok(false);
        }
        let gate = lock(&self.inner.preparing)
            .entry(sha.clone())
            .or_default()
            .clone();
        let _held = gate.lock().await;
        if self.inner.runtime.is_prepared(&sha) {
            return Ok(true);
        }
        let rt = self.inner.runtime.clone();
        let s = sha.clone();
        let on_disk = tokio::task::spawn_blocking(move || rt.prepare_from_disk(&s))
            .await
            .map_err(|e| Error::internal(format!("prepare task: {e}")))?
            .map_err(Error::from)?;
        if !on_disk {
            let bytes = self.fetch(&sha, spec.package_size).await?;
            let rt = self.inner.runtime.clone();
            let s = sha.clone();
            tokio::task::spawn_blocking(move || rt.prepare(&s, &bytes))
                .await
                .map_err(|e| Error::internal(format!("prepare task: {e}")))?
                .map_err(Error::from)?;
        }
        Ok(true)
    }

    /// Gateways to fetch from, in random order (spreads load; one that is down is
    /// skipped).
    async fn gateway_urls(&self) -> Result<Vec<String>, Error> {
        if let Some(g) = &self.inner.cfg.gateway {
            return Ok(vec![g.trim_end_matches('/').to_string()]);
        }
        let store = self
            .inner
            .store
            .as_ref()
            .ok_or_else(|| Error::new(ErrorCode::Unavailable, "no gateway configured"))?;
        let r = store.range(keys::GATEWAYS).await.map_err(Error::from)?;
        let mut urls: Vec<String> = r
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<GatewayRecord>(&kv.value).ok())
            .map(|g| g.url.trim_end_matches('/').to_string())
            .collect();
        if urls.is_empty() {
            return Err(Error::new(
                ErrorCode::Unavailable,
                "no gateway registered to fetch packages from",
            ));
        }
        use rand::seq::SliceRandom;
        urls.shuffle(&mut rand::rng());
        Ok(urls)
    }

    async fn fetch(&self, sha: &str, expected_size: u64) -> Result<Vec<u8>, Error> {
        let mut last = Error::new(ErrorCode::Unavailable, "no gateway answered");
        for base in self.gateway_urls().await? {
            match self.fetch_from(&base, sha, expected_size).await {
                Ok(bytes) => return Ok(bytes),
                // The package is unknown or wrong there: no other gateway will differ.
                Err(e) if e.code != ErrorCode::Unavailable => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn fetch_from(
        &self,
        base: &str,
        sha: &str,
        expected_size: u64,
    ) -> Result<Vec<u8>, Error> {
        let url = format!("{base}/v1/packages/{sha}");
        let mut req = self.inner.http.get(&url).timeout(Duration::from_secs(300));
        if let Some(t) = &self.inner.cfg.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| {
            Error::new(
                ErrorCode::Unavailable,
                format!("fetch package {sha} from {base}: {e}"),
            )
        })?;
        let status = resp.status();
        if !status.is_success() {
            let code = match status.as_u16() {
                404 => ErrorCode::PackageNotFound,
                401 | 403 => ErrorCode::Unauthorized,
                _ => ErrorCode::Unavailable,
            };
            return Err(Error::new(
                code,
                format!("fetch package {sha} from {base}: HTTP {status}"),
            ));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::new(ErrorCode::Unavailable, format!("fetch package {sha}: {e}")))?;
        if expected_size > 0 && bytes.len() as u64 != expected_size {
            return Err(Error::new(
                ErrorCode::InvalidPackage,
                format!(
                    "package {sha} is {} bytes, expected {expected_size}",
                    bytes.len()
                ),
            ));
        }
        debug!(sha, bytes = bytes.len(), "fetched package");
        Ok(bytes.to_vec())
    }
}

fn reject(a: &proto::Assignment, reason: &str) -> NodeMessage {
    NodeMessage {
        msg: Some(node_message::Msg::Reject(Reject {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            reason: reason.into(),
        })),
    }
}

/// The invocation's own environment (an OpenFaaS request's `Http_…` variables): only
/// names that start with `Http_` and are plain identifiers, so a caller can never set
/// `LD_PRELOAD`, `PATH` or the operator's variables.
fn request_env(env: Vec<proto::EnvVar>) -> impl Iterator<Item = (String, String)> {
    env.into_iter()
        .filter(|v| {
            v.name.starts_with("Http_")
                && v.name.len() <= 128
                && v.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !v.value.contains('\0')
        })
        .map(|v| (v.name, v.value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invocation_sets_only_http_variables() {
        let var = |n: &str, v: &str| proto::EnvVar {
            name: n.into(),
            value: v.into(),
        };
        let kept: Vec<_> = request_env(vec![
            var("Http_Method", "PUT"),
            var("Http_X_Trace_Id", "a b"),
            var("LD_PRELOAD", "/tmp/evil.so"),
            var("PATH", "/tmp"),
            var("Http_Bad=Name", "x"),
            var("Http_Nul", "a\0b"),
            var("http_method", "lowercase is not ours"),
        ])
        .collect();
        assert_eq!(
            kept,
            [
                ("Http_Method".to_string(), "PUT".to_string()),
                ("Http_X_Trace_Id".to_string(), "a b".to_string())
            ]
        );
    }
}
