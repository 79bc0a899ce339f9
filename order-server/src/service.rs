//! The gRPC service: node attachment streams, synchronous invocations, and the
//! background duties of an instance (heartbeat reaping, registration, prefetch).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_core::model::{
    Capacity, NodeAdmin, NodeAdminRecord, NodeRecord, NodeState, OrderServerRecord, VersionRecord,
};
use ferry_core::proto::{
    self, Assignment, InvokeReply, InvokeRequest, NodeMessage, Prefetch, Registered, ServerMessage,
    node_message, server_message,
};
use ferry_core::{Error, ErrorCode, keys};
use ferry_store::{EventKind, LeaseKeeper, Store, WatchCache};
use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::Config;
use crate::placement::Need;
use crate::registry::{Carried, NodeEvent, Registry, RegistryConfig, Reply};

/// Shared state of one instance; cheap to clone.
#[derive(Clone)]
pub struct OrderService {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: Config,
    url: String,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) nodes: Registry,
    next_conn: AtomicU64,
    /// Wakes the registration task when the attached set changes.
    changed: Notify,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    lease: std::sync::Mutex<Option<Arc<LeaseKeeper>>>,
    /// create_revision of our registration key: the fencing token of this incarnation
    /// (0 until registered). A lost and re-granted lease makes a new incarnation.
    incarnation: AtomicI64,
    /// This cluster's task queue (parsed and sorted as it arrives), the live
    /// instances, cancellation requests, and the queues' definitions (their MRTs).
    pub(crate) queue: crate::queue_index::QueueIndex,
    pub(crate) instances: WatchCache,
    pub(crate) cancels: WatchCache,
    pub(crate) queue_defs: WatchCache,
    /// The queue definitions' MRTs, parsed at a revision of `queue_defs`.
    pub(crate) mrts: std::sync::Mutex<crate::tasks::Mrts>,
    /// Async tasks this instance runs now, and how many per queue.
    pub(crate) inflight: std::sync::Mutex<crate::tasks::InflightSet>,
    /// Queued tasks a claim transaction of ours holds now (skipped by the next pass).
    pub(crate) claiming: std::sync::Mutex<std::collections::HashMap<String, String>>,
    pub(crate) claims_in_flight: Arc<tokio::sync::Semaphore>,
    /// Wakes the claim loop when a node frees a slot or attaches.
    pub(crate) capacity_freed: Notify,
    /// Completions refused as stale (an old attempt, or after our lease was lost).
    pub(crate) stale_completions: AtomicU64,
    /// Claims, commits and orphan re-queues since start (for `/metrics`).
    pub(crate) counts: crate::metrics::Counts,
    /// The operator's settings for this cluster's nodes (drain, eject, restore).
    node_admin: WatchCache,
    /// This cluster's node records (state, owner, breakers), so an attaching node's
    /// breakers are resumed from memory: a burst of attachments (thousands of nodes
    /// reconnecting at once) reads nothing from the store.
    node_records: WatchCache,
    /// Callbacks still to deliver, and a wake-up when a delivery ends.
    pub(crate) callbacks: WatchCache,
    pub(crate) callback_done: Notify,
    /// Task commits, grouped into shared transactions when they come together.
    pub(crate) committer: crate::batcher::Batcher,
}

impl OrderService {
    pub(crate) async fn start(
        cfg: Config,
        url: String,
        store: Arc<dyn Store>,
    ) -> Result<Self, ferry_store::StoreError> {
        let queue =
            crate::queue_index::QueueIndex::start(store.clone(), &keys::queue_of(&cfg.cluster))
                .await?;
        let queue_defs = WatchCache::start(store.clone(), keys::QUEUES).await?;
        let instances =
            WatchCache::start(store.clone(), &keys::order_servers_of(&cfg.cluster)).await?;
        let cancels = WatchCache::start(store.clone(), keys::CANCELS).await?;
        let node_admin =
            WatchCache::start(store.clone(), &keys::node_admin_of(&cfg.cluster)).await?;
        let callbacks = WatchCache::start(store.clone(), &keys::callbacks_of(&cfg.cluster)).await?;
        let node_records = WatchCache::start(store.clone(), &keys::nodes_of(&cfg.cluster)).await?;
        let committer = crate::batcher::Batcher::start(store.clone());
        let (events_tx, events) = mpsc::unbounded_channel();
        let registry_cfg = RegistryConfig {
            suspect_after: cfg.suspect_after,
            breaker: cfg.breaker,
        };
        let svc = Self {
            inner: Arc::new(Inner {
                cfg,
                url,
                store,
                nodes: Registry::new(registry_cfg, Some(events_tx)),
                next_conn: AtomicU64::new(1),
                changed: Notify::new(),
                tasks: std::sync::Mutex::new(Vec::new()),
                lease: std::sync::Mutex::new(None),
                incarnation: AtomicI64::new(0),
                queue,
                instances,
                cancels,
                queue_defs,
                mrts: Default::default(),
                inflight: Default::default(),
                claiming: Default::default(),
                claims_in_flight: Arc::new(tokio::sync::Semaphore::new(
                    crate::tasks::CLAIMS_IN_FLIGHT,
                )),
                capacity_freed: Notify::new(),
                stale_completions: AtomicU64::new(0),
                counts: Default::default(),
                node_admin,
                node_records,
                callbacks,
                callback_done: Notify::new(),
                committer,
            }),
        };
        svc.register().await?;
        let handles = vec![
            tokio::spawn(svc.clone().reap_loop()),
            tokio::spawn(svc.clone().registration_loop()),
            tokio::spawn(svc.clone().prefetch_loop()),
            tokio::spawn(svc.clone().claim_loop()),
            tokio::spawn(svc.clone().orphan_loop()),
            tokio::spawn(svc.clone().cancel_loop()),
            tokio::spawn(svc.clone().node_event_loop(events)),
            tokio::spawn(svc.clone().node_admin_loop()),
            tokio::spawn(svc.clone().retention_loop()),
            tokio::spawn(svc.clone().callback_loop()),
        ];
        svc.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(handles);
        Ok(svc)
    }

    /// Stops background work, drops every node stream and revokes the registration.
    pub(crate) async fn close(&self) {
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        // Tasks still running hold clones of the caches: stop their watches now, so
        // nothing of this instance keeps reading the store after it has shut down.
        let i = &self.inner;
        i.queue.stop();
        for cache in [
            &i.queue_defs,
            &i.instances,
            &i.cancels,
            &i.node_admin,
            &i.node_records,
            &i.callbacks,
        ] {
            cache.stop();
        }
        self.inner.nodes.clear();
        let lease = self
            .inner
            .lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(lease) = lease {
            let _ = self.inner.store.revoke_lease(lease.id()).await;
        }
    }

    fn current_lease(&self) -> Option<Arc<LeaseKeeper>> {
        self.inner
            .lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self) -> OrderServerRecord {
        let (nodes, capacity) = self.inner.nodes.summary();
        OrderServerRecord {
            id: self.inner.cfg.id.clone(),
            cluster: self.inner.cfg.cluster.clone(),
            addr: self.inner.url.clone(),
            nodes,
            capacity,
            started_ms: ferry_core::now_ms(),
        }
    }

    /// Writes this instance's record under its lease (granting a new one if it was lost).
    async fn register(&self) -> Result<(), ferry_store::StoreError> {
        let keeper = match self.current_lease() {
            Some(k) if !k.is_lost() => k,
            _ => {
                let k = Arc::new(
                    LeaseKeeper::start(self.inner.store.clone(), self.inner.cfg.lease_ttl).await?,
                );
                *self.inner.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(k.clone());
                k
            }
        };
        let key = keys::order_server(&self.inner.cfg.cluster, &self.inner.cfg.id);
        let value = serde_json::to_vec(&self.record()).unwrap_or_default();
        self.inner.store.put(&key, value, keeper.id()).await?;
        if let Some(kv) = self.inner.store.get(&key).await? {
            let before = self
                .inner
                .incarnation
                .swap(kv.create_revision, Ordering::SeqCst);
            if before != 0 && before != kv.create_revision {
                warn!(
                    old = before,
                    new = kv.create_revision,
                    "new incarnation: tasks of the old one are orphans now"
                );
            }
        }
        Ok(())
    }

    /// The fencing token of this incarnation (0 before the first registration).
    pub(crate) fn incarnation(&self) -> i64 {
        self.inner.incarnation.load(Ordering::SeqCst)
    }

    /// Stale completions refused so far.
    pub fn stale_completions(&self) -> u64 {
        self.inner.stale_completions.load(Ordering::Relaxed)
    }

    /// Re-writes the registration when the attached set changes or the lease is lost.
    async fn registration_loop(self) {
        loop {
            let keeper = self.current_lease();
            let lost = async {
                match &keeper {
                    Some(k) => k.lost().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.inner.changed.notified() => {}
                _ = lost => warn!("order-server lease lost; registering again"),
            }
            if let Err(e) = self.register().await {
                warn!(error = %e, "order-server registration failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.inner.changed.notify_one();
            }
        }
    }

    /// Declares silent nodes dead: their streams are closed, their waiting tasks fail
    /// over, and the transition is written to the store.
    async fn reap_loop(self) {
        let period = self.inner.cfg.heartbeat.min(Duration::from_millis(500));
        loop {
            tokio::time::sleep(period).await;
            for id in self.inner.nodes.mark_suspects() {
                warn!(node_id = %id, "node is silent; suspect (no new work)");
                let svc = self.clone();
                tokio::spawn(async move { svc.record_state(&id, NodeState::Suspect).await });
            }
            for (id, conn, tx) in self.inner.nodes.silent(self.inner.cfg.dead_after) {
                warn!(node_id = %id, "node missed heartbeats; declaring it dead");
                let _ = tx.try_send(Err(Status::unavailable("heartbeat timeout")));
                self.detach(&id, conn, "heartbeat timeout");
            }
        }
    }

    /// Tells attached nodes about each new version so they fetch and compile it before
    /// its first invocation.
    async fn prefetch_loop(self) {
        loop {
            let mut watch = match self.inner.store.watch(keys::VERSIONS, 0).await {
                Ok(w) => w,
                Err(e) => {
                    debug!(error = %e, "prefetch watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(Ok(ev)) = watch.next().await {
                if ev.kind != EventKind::Put {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<VersionRecord>(&ev.kv.value) else {
                    continue;
                };
                let msg = ServerMessage {
                    msg: Some(server_message::Msg::Prefetch(Prefetch {
                        function: Some(v.spec()),
                    })),
                };
                for (node_id, tx) in self.inner.nodes.all() {
                    if tx.try_send(Ok(msg.clone())).is_ok() {
                        self.inner.nodes.note_package(&node_id, &v.sha256);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Removes the node from placement at once; records the transition in the
    /// background (a slow store must not keep a dead node placeable).
    fn detach(&self, node_id: &str, conn: u64, why: &str) {
        let Some((attach_rev, carried)) = self.inner.nodes.detach(node_id, conn) else {
            return;
        };
        info!(node_id, why, "node detached");
        self.inner.changed.notify_one();
        let svc = self.clone();
        let node_id = node_id.to_string();
        tokio::spawn(async move { svc.record_dead(&node_id, attach_rev, carried).await });
    }

    /// The breakers a node's last attachment left in its record, as the watch of
    /// node records has it (none when it was never ejected, or when an operator
    /// restored it since; a record written elsewhere a moment ago may not be here yet).
    fn carried_breakers(&self, node_id: &str) -> Carried {
        let cluster = &self.inner.cfg.cluster;
        let Some(record) = self
            .inner
            .node_records
            .get(&keys::node(cluster, node_id))
            .and_then(|kv| serde_json::from_slice::<NodeRecord>(&kv.value).ok())
        else {
            return Carried::default();
        };
        let restored = self
            .inner
            .node_admin
            .get(&keys::node_admin(cluster, node_id))
            .and_then(|kv| serde_json::from_slice::<NodeAdminRecord>(&kv.value).ok())
            .is_some_and(|a| a.state == NodeAdmin::Active && a.since_ms >= record.since_ms);
        if restored {
            return Carried::default();
        }
        Carried {
            node: record.breaker,
            functions: record.function_breakers,
        }
    }

    /// Writes the node's `dead` record, fenced on our own attach write: if the node has
    /// attached elsewhere since, the record is no longer ours to change.
    async fn record_dead(&self, node_id: &str, attach_rev: i64, carried: Carried) {
        if attach_rev <= 0 {
            return;
        }
        let record = NodeRecord {
            id: node_id.to_string(),
            cluster: self.inner.cfg.cluster.clone(),
            state: NodeState::Dead,
            order_server: self.inner.cfg.id.clone(),
            capacity: Capacity::default(),
            tags: vec![],
            labels: Default::default(),
            since_ms: ferry_core::now_ms(),
            breaker: carried.node,
            function_breakers: carried.functions,
        };
        let key = keys::node(&self.inner.cfg.cluster, node_id);
        if let Err(e) = self
            .inner
            .store
            .compare_and_put(
                &key,
                serde_json::to_vec(&record).unwrap_or_default(),
                attach_rev,
            )
            .await
        {
            warn!(node_id, error = %e, "could not record node detach");
        }
    }

    /// Writes a node's state transition (suspect, ejected, attached again), fenced on
    /// this attachment's last write: a node that moved to another instance since is not
    /// ours to describe.
    async fn record_state(&self, node_id: &str, state: NodeState) {
        let Some((conn, rev, capacity, tags, labels)) = self.inner.nodes.attachment(node_id) else {
            return;
        };
        let carried = self.inner.nodes.carried(node_id);
        if rev <= 0 {
            return;
        }
        let record = NodeRecord {
            id: node_id.to_string(),
            cluster: self.inner.cfg.cluster.clone(),
            state,
            order_server: self.inner.cfg.id.clone(),
            capacity,
            tags,
            labels,
            since_ms: ferry_core::now_ms(),
            breaker: carried.node,
            function_breakers: carried.functions,
        };
        let key = keys::node(&self.inner.cfg.cluster, node_id);
        match self
            .inner
            .store
            .compare_and_put(&key, serde_json::to_vec(&record).unwrap_or_default(), rev)
            .await
        {
            Ok(Some(new_rev)) => {
                self.inner.nodes.set_attach_rev(node_id, conn, new_rev);
            }
            Ok(None) => debug!(node_id, "node record moved on; transition not recorded"),
            Err(e) => warn!(node_id, error = %e, "could not record node transition"),
        }
    }

    /// Records the node's breakers, its state unchanged.
    async fn record_breakers(&self, node_id: &str) {
        if let Some(state) = self.inner.nodes.node_state(node_id) {
            self.record_state(node_id, state).await;
        }
    }

    /// Logs breaker transitions and records them in the node's record.
    async fn node_event_loop(self, mut events: mpsc::UnboundedReceiver<NodeEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                NodeEvent::Ejected {
                    node,
                    function,
                    for_ms,
                    ejections,
                } => {
                    warn!(node_id = %node, function = function.as_deref().unwrap_or("*"), for_ms, ejections, "circuit breaker opened: node ejected");
                    // A function's ejection leaves the node's state as it is.
                    match function {
                        None => self.record_state(&node, NodeState::Ejected).await,
                        Some(_) => self.record_breakers(&node).await,
                    }
                }
                NodeEvent::Restored { node, function } => {
                    info!(node_id = %node, function = function.as_deref().unwrap_or("*"), "probe succeeded: circuit breaker closed");
                    match function {
                        None => self.record_state(&node, NodeState::Attached).await,
                        Some(_) => self.record_breakers(&node).await,
                    }
                }
                NodeEvent::Spared { node, function } => {
                    warn!(node_id = %node, function = function.as_deref().unwrap_or("*"), "failure threshold crossed, but the pool's ejection budget is spent");
                }
            }
            self.inner.capacity_freed.notify_one();
        }
    }

    /// Keeps the registry's copy of the operator's node settings current. A node set
    /// back to active (a restore) has its breakers closed.
    async fn node_admin_loop(self) {
        let mut changes = self.inner.node_admin.changes();
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        // Settings found at start are not news: only later restores close breakers
        // (an older one is already honoured: see `carried_breakers`).
        let mut first = true;
        loop {
            let mut admin = std::collections::HashMap::new();
            let mut restored = vec![];
            for kv in self.inner.node_admin.snapshot() {
                let Ok(r) = serde_json::from_slice::<NodeAdminRecord>(&kv.value) else {
                    continue;
                };
                if r.state == NodeAdmin::Active {
                    if !first && seen.get(&r.node).is_none_or(|s| *s < r.since_ms) {
                        restored.push(r.node.clone());
                    }
                } else {
                    admin.insert(r.node.clone(), r.state);
                }
                seen.insert(r.node, r.since_ms);
            }
            if !restored.is_empty() {
                info!(nodes = ?restored, "nodes restored by an operator");
            }
            self.inner.nodes.set_admin(admin, &restored);
            // Their records forget the breakers too (for the node's next attachment).
            for node in restored {
                let svc = self.clone();
                tokio::spawn(async move { svc.record_state(&node, NodeState::Attached).await });
            }
            self.inner.capacity_freed.notify_one();
            first = false;
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    async fn handle_node_message(&self, node_id: &str, conn: u64, msg: NodeMessage) {
        let nodes = &self.inner.nodes;
        match msg.msg {
            Some(node_message::Msg::Heartbeat(hb)) => {
                if nodes.heartbeat(node_id, conn, hb.used.as_ref().map(Capacity::from)) {
                    info!(node_id, "suspect node is heartbeating again");
                    let svc = self.clone();
                    let id = node_id.to_string();
                    tokio::spawn(async move { svc.record_state(&id, NodeState::Attached).await });
                }
                self.inner.capacity_freed.notify_one();
            }
            Some(node_message::Msg::Accept(a)) => {
                nodes.heartbeat(node_id, conn, None);
                debug!(node_id, task_id = %a.task_id, attempt = a.attempt, "accepted");
            }
            Some(node_message::Msg::Reject(r)) => {
                nodes.complete(node_id, conn, &r.task_id, Reply::Rejected(r.reason));
                self.inner.capacity_freed.notify_one();
            }
            Some(node_message::Msg::Progress(p)) => {
                debug!(node_id, task_id = %p.task_id, percent = p.percent, "progress");
                self.progress(p);
            }
            Some(node_message::Msg::Result(r)) => {
                nodes.heartbeat(node_id, conn, None);
                let task_id = r.task_id.clone();
                let unclaimed = nodes.complete(node_id, conn, &task_id, Reply::Done(r));
                self.inner.capacity_freed.notify_one();
                // An async task's result that this instance did not place (its node
                // moved here from an instance that died): try to adopt it.
                if let Some(Reply::Done(r)) = unclaimed
                    && task_id.contains('#')
                {
                    let svc = self.clone();
                    tokio::spawn(async move { svc.adopt(r).await });
                }
            }
            Some(node_message::Msg::Register(_)) | None => {
                debug!(node_id, "ignoring unexpected message on an attached stream");
            }
        }
    }
}

fn bad(msg: impl Into<String>) -> Status {
    Error::new(ErrorCode::BadRequest, msg).to_status()
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl proto::order_server::Order for OrderService {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| bad("no Register message within 10 s"))??;
        let Some(NodeMessage {
            msg: Some(node_message::Msg::Register(reg)),
        }) = first
        else {
            return Err(bad(
                "the first message on an Attach stream must be Register",
            ));
        };
        let id_ok = (1..=128).contains(&reg.node_id.len())
            && reg
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !id_ok {
            return Err(bad(format!("invalid node id {:?}", reg.node_id)));
        }
        let capacity = reg
            .capacity
            .as_ref()
            .map(Capacity::from)
            .unwrap_or_default();
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        let node_id = reg.node_id.clone();
        let carried = self.carried_breakers(&node_id);
        self.inner.nodes.attach(
            &node_id,
            conn,
            capacity,
            reg.tags.clone(),
            reg.labels.clone().into_iter().collect(),
            reg.cached_packages.clone(),
            tx.clone(),
            carried,
        );
        let hello = ServerMessage {
            msg: Some(server_message::Msg::Registered(Registered {
                server_id: self.inner.cfg.id.clone(),
                heartbeat_ms: self.inner.cfg.heartbeat.as_millis() as u32,
            })),
        };
        let _ = tx.send(Ok(hello)).await;
        info!(node_id = %node_id, ?capacity, tags = ?reg.tags, "node attached");
        self.inner.capacity_freed.notify_one();

        // Transition to the store: attached here, fenced by the revision we wrote.
        let carried = self.inner.nodes.carried(&node_id);
        let record = NodeRecord {
            id: node_id.clone(),
            cluster: self.inner.cfg.cluster.clone(),
            state: match carried.node {
                Some(b) if b.until_ms > 0 => NodeState::Ejected,
                _ => NodeState::Attached,
            },
            order_server: self.inner.cfg.id.clone(),
            capacity,
            tags: reg.tags,
            labels: reg.labels.into_iter().collect(),
            since_ms: ferry_core::now_ms(),
            breaker: carried.node,
            function_breakers: carried.functions.clone(),
        };
        let svc = self.clone();
        let reader_node = node_id.clone();
        let reader = async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => svc.handle_node_message(&reader_node, conn, msg).await,
                    Ok(None) => break svc.detach(&reader_node, conn, "stream closed"),
                    Err(e) => {
                        break svc.detach(
                            &reader_node,
                            conn,
                            &format!("stream error: {}", e.message()),
                        );
                    }
                }
            }
        };
        // The attach record is written in the background: attaching never waits on the
        // store. If the node is gone again by the time it lands, mark it dead.
        let svc = self.clone();
        let key = keys::node(&self.inner.cfg.cluster, &node_id);
        tokio::spawn(async move {
            match svc
                .inner
                .store
                .put(&key, serde_json::to_vec(&record).unwrap_or_default(), 0)
                .await
            {
                Ok(rev) => {
                    if !svc.inner.nodes.set_attach_rev(&node_id, conn, rev) {
                        svc.record_dead(&node_id, rev, carried).await;
                    }
                }
                Err(e) => warn!(node_id = %node_id, error = %e, "could not record node attach"),
            }
            svc.inner.changed.notify_one();
        });
        tokio::spawn(reader.instrument(info_span!("node", node_id = %reg.node_id)));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn nodes(
        &self,
        _request: Request<proto::NodesRequest>,
    ) -> Result<Response<proto::NodesReply>, Status> {
        Ok(Response::new(proto::NodesReply {
            server_id: self.inner.cfg.id.clone(),
            nodes: self.inner.nodes.statuses(),
        }))
    }

    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeReply>, Status> {
        let req = request.into_inner();
        let spec = req
            .function
            .ok_or_else(|| bad("InvokeRequest.function is required"))?;
        let span = info_span!("invoke", function = %spec.name, version = spec.version, request_id = %req.request_id);
        self.invoke_inner(spec, req.input, req.request_id, req.env)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

impl OrderService {
    async fn invoke_inner(
        &self,
        spec: proto::FunctionSpec,
        input: Vec<u8>,
        request_id: String,
        env: Vec<proto::EnvVar>,
    ) -> Result<InvokeReply, Error> {
        let need = Need::of(&spec);
        let deadline = Duration::from_millis(spec.timeout_ms) + self.inner.cfg.assignment_grace;
        let started = Instant::now();
        let mut excluded = HashSet::new();
        // A node may reject (its own view of its capacity is the truth): try every other
        // node that fits, each at most once.
        let tries = self.inner.nodes.len().clamp(1, 64) as u32;
        for attempt in 1..=tries {
            let task_id = ferry_core::id::new_id();
            let Some(placed) = self.inner.nodes.place(
                &task_id,
                &spec.package_sha256,
                &spec.name,
                &need,
                &excluded,
            ) else {
                break;
            };
            let assignment = ServerMessage {
                msg: Some(server_message::Msg::Assignment(Assignment {
                    task_id: task_id.clone(),
                    attempt,
                    epoch: 0,
                    function: Some(spec.clone()),
                    input: input.clone(),
                    request_id: request_id.clone(),
                    env: env.clone(),
                })),
            };
            if placed.tx.send(Ok(assignment)).await.is_err() {
                self.inner.nodes.abandon(&placed.node_id, &task_id);
                excluded.insert(placed.node_id);
                continue;
            }
            // If this future is dropped (the caller went away or its deadline passed)
            // or times out, the reservation is freed and the node told to stop.
            let mut guard = CancelOnDrop {
                nodes: &self.inner.nodes,
                node_id: placed.node_id.clone(),
                task_id: task_id.clone(),
                attempt,
                tx: placed.tx.clone(),
                armed: true,
            };
            let left = deadline.saturating_sub(started.elapsed());
            let reply = tokio::time::timeout(left, placed.reply).await;
            if reply.is_ok() {
                guard.armed = false;
            }
            drop(guard);
            match reply {
                Ok(Ok(Reply::Done(r))) => {
                    return Ok(InvokeReply {
                        outcome: r.outcome,
                        output: r.output,
                        error: r.error,
                        log_tail: r.log_tail,
                        node_id: placed.node_id,
                        duration_us: r.duration_us,
                        cold: r.cold,
                        error_code: r.error_code,
                    });
                }
                Ok(Ok(Reply::Rejected(reason))) => {
                    debug!(node_id = %placed.node_id, %reason, "assignment rejected; placing elsewhere");
                    excluded.insert(placed.node_id);
                }
                Ok(Err(_)) => {
                    return Err(Error::new(
                        ErrorCode::NodeLost,
                        format!(
                            "node {} was lost while running the function",
                            placed.node_id
                        ),
                    ));
                }
                Err(_) => {
                    self.inner.nodes.timed_out(&placed.node_id, &task_id);
                    return Err(Error::new(
                        ErrorCode::Timeout,
                        format!("no result within {} ms", deadline.as_millis()),
                    ));
                }
            }
        }
        Err(Error::new(
            ErrorCode::NoCapacity,
            format!(
                "no attached node has room for {} ({} millicores, {} MiB)",
                spec.name, spec.cpu_millis, spec.memory_mb
            ),
        ))
    }
}

/// Frees a placed task's reservation and tells its node to stop, unless disarmed.
struct CancelOnDrop<'a> {
    nodes: &'a Registry,
    node_id: String,
    task_id: String,
    attempt: u32,
    tx: crate::registry::Outbound,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.nodes.abandon(&self.node_id, &self.task_id);
        let cancel = proto::Cancel {
            task_id: std::mem::take(&mut self.task_id),
            attempt: self.attempt,
        };
        let _ = self.tx.try_send(Ok(ServerMessage {
            msg: Some(server_message::Msg::Cancel(cancel)),
        }));
    }
}
