//! `ferry bench schedule`: the order-server alone, with simulated node agents.
//!
//! Simulated nodes are in-process gRPC clients on the real Attach protocol (register,
//! heartbeat every second) that answer every assignment with a success at once, so
//! what is measured is the scheduler: claiming from the queue, placing, and committing
//! each result with its fenced transaction. Tasks are queued before any node attaches;
//! the clock runs from the first node's registration to the last result committed.
//!
//! A baseline in the same run issues the same store transactions per task with nothing
//! else (see [`store_floor`]): the ratio says how much of the store's own ceiling the
//! scheduler reaches.
//!
//! A second scenario measures failure detection: a node that takes a task and goes
//! silent (no heartbeat, no answer) is declared dead, and the task runs elsewhere.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_core::keys;
use ferry_core::model::{Capacity, VersionRecord};
use ferry_core::package::{Kind, Limits};
use ferry_core::proto::{
    self, NodeMessage, Outcome, Register, TaskResult, node_message, order_client::OrderClient,
    server_message,
};
use ferry_core::task::{Priority, RetryPolicy, TaskRecord};
use ferry_store::{Op, Store, Txn};
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::transport::Channel;

const TOKEN: &str = "bench-token";
const CLUSTER: &str = "bench";
/// Node streams multiplexed on one HTTP/2 connection.
const STREAMS_PER_CONNECTION: usize = 100;

#[derive(Args, Debug)]
pub struct ScheduleBench {
    /// Node counts to run with (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub nodes: Vec<usize>,
    /// Tasks per run
    #[arg(long, default_value_t = 20_000)]
    pub tasks: usize,
    /// Stores to run on: embedded, etcd (a local etcd started for the run)
    #[arg(long, value_delimiter = ',', default_value = "embedded,etcd")]
    pub stores: Vec<String>,
    /// Task slots per simulated node
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
}

/// A store for one run, and what keeps it alive.
struct BenchStore {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
    _etcd: Option<ferry_store::testing::EtcdServer>,
}

async fn open(kind: &str) -> anyhow::Result<BenchStore> {
    let dir = tempfile::tempdir().context("create a temporary folder")?;
    match kind {
        "embedded" => {
            let url = format!("embedded:{}", dir.path().join("store").display());
            let store = ferry_store::open(&url).await.context("open the store")?;
            Ok(BenchStore {
                store,
                _dir: dir,
                _etcd: None,
            })
        }
        "etcd" => {
            let etcd = ferry_store::testing::EtcdServer::start()
                .context("start etcd (Debian's etcd-server must be installed)")?;
            let store = ferry_store::open(&etcd.url()).await.context("open etcd")?;
            Ok(BenchStore {
                store,
                _dir: dir,
                _etcd: Some(etcd),
            })
        }
        other => anyhow::bail!("unknown store {other:?}: use embedded or etcd"),
    }
}

fn version() -> VersionRecord {
    VersionRecord {
        name: "sim".into(),
        version: 1,
        sha256: "0".repeat(64),
        size: 1,
        kind: Kind::Native,
        limits: Limits {
            memory_mb: 16,
            timeout_ms: 60_000,
            cpu_millis: 10,
        },
        resources: Default::default(),
        retry: RetryPolicy::default(),
        created_ms: 0,
    }
}

/// Queues `n` tasks (task record + queue entry per task, 40 tasks a transaction, 16
/// transactions in flight). Returns their ids.
async fn enqueue(store: &Arc<dyn Store>, n: usize) -> anyhow::Result<Vec<String>> {
    let v = version();
    let now = ferry_core::now_ms();
    let ids: Vec<String> = (0..n).map(|_| ferry_core::id::new_id()).collect();
    let batches: Vec<Txn> = ids
        .chunks(40)
        .map(|chunk| {
            let mut txn = Txn::new();
            for id in chunk {
                let t = TaskRecord::new(
                    id.clone(),
                    v.clone(),
                    CLUSTER.into(),
                    Priority::Normal,
                    b"{}".to_vec(),
                    now,
                );
                txn = txn
                    .then(Op::put(
                        keys::task(id),
                        serde_json::to_vec(&t).unwrap_or_default(),
                    ))
                    .then(Op::put(
                        keys::queued(CLUSTER, id),
                        serde_json::to_vec(&t.queue_entry()).unwrap_or_default(),
                    ));
            }
            txn
        })
        .collect();
    let results: Vec<_> = futures::stream::iter(batches)
        .map(|txn| {
            let store = store.clone();
            async move { store.txn(txn).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r.context("queue tasks")?;
    }
    Ok(ids)
}

/// The store's share of the work alone, as a baseline: per task the same
/// transactions the order-server issues (a batched read of the records, a batched
/// claim fenced like Ferry's, commits grouped as its batcher groups them), with the
/// same JSON records and the same concurrency, straight at the store: no queue index,
/// placement, gRPC or nodes. Returns tasks/s.
async fn store_floor(kind: &str, tasks: usize) -> anyhow::Result<f64> {
    use ferry_core::task::{Claim, TaskState};
    use ferry_store::Compare;
    let bs = open(kind).await?;
    let store = bs.store.clone();
    let ids = enqueue(&store, tasks).await?;
    let fence_key = "/ferry/bench/fence";
    store
        .put(fence_key, b"x".to_vec(), ferry_store::NO_LEASE)
        .await
        .context("write the fence key")?;
    let fence_rev = store
        .get(fence_key)
        .await?
        .map_or(0, |kv| kv.create_revision);
    let fence = || Compare {
        key: fence_key.to_string(),
        op: ferry_store::CompareOp::Equal,
        target: ferry_store::CompareTarget::CreateRevision(fence_rev),
    };
    let started = Instant::now();
    let batches: Vec<Vec<String>> = ids.chunks(32).map(<[String]>::to_vec).collect();
    let runs = futures::stream::iter(batches).map(|chunk| {
        let store = store.clone();
        async move {
            let read = Txn {
                success: chunk.iter().map(|id| Op::get(keys::task(id))).collect(),
                ..Txn::default()
            };
            let gets = store.txn(read).await?.gets;
            let now = ferry_core::now_ms();
            let mut claim = Txn::new().when(fence());
            let mut running = vec![];
            for (id, kv) in chunk.iter().zip(gets) {
                let kv = kv.context("a queued task's record")?;
                let t: TaskRecord = serde_json::from_slice(&kv.value)?;
                let mark = Claim {
                    by: "bench@1".into(),
                    attempt: t.attempt + 1,
                    node: "sim-000001".into(),
                    started_ms: now,
                };
                let mut entry = t.queue_entry();
                entry.claim = Some(mark.clone());
                let queued = keys::queued(CLUSTER, id);
                claim = claim
                    .when(Compare::mod_revision(&queued, kv.mod_revision))
                    .then(Op::put(queued.clone(), serde_json::to_vec(&entry)?));
                running.push((t.with_claim(&mark), queued));
            }
            let claimed = store.txn(claim).await?;
            anyhow::ensure!(claimed.succeeded, "the baseline's claim lost a race");
            for group in running.chunks(24) {
                let mut commit = Txn::new().when(fence());
                for (t, queued) in group {
                    let mut t = t.clone();
                    t.state = TaskState::Succeeded;
                    t.output = Some(b"ok".to_vec());
                    commit = commit
                        .when(Compare::mod_revision(queued, claimed.revision))
                        .then(Op::delete(queued.clone()))
                        .then(Op::delete(keys::cancel(&t.id)))
                        .then(Op::put(keys::task(&t.id), serde_json::to_vec(&t)?));
                }
                // One finish-time key for the group, as the committer files it.
                let first = &group[0].0.id;
                commit = commit.then(Op::put(
                    keys::done(CLUSTER, now, first),
                    keys::done_group_value(
                        group
                            .iter()
                            .map(|(t, _)| (t.id.as_str(), t.created_ms, t.function.as_str())),
                    ),
                ));
                anyhow::ensure!(
                    store.txn(commit).await?.succeeded,
                    "the baseline's commit lost a race"
                );
            }
            anyhow::Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = runs.buffer_unordered(16).collect().await;
    for r in results {
        r?;
    }
    Ok(tasks as f64 / started.elapsed().as_secs_f64())
}

/// How a simulated node behaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers every assignment with a success at once.
    Healthy,
    /// Takes its first assignment, then never speaks again (no heartbeat, no answer).
    GoesSilent,
}

/// What the simulated nodes tell the benchmark.
enum Event {
    Registered,
    /// A node received an assignment.
    Assigned(String, Instant),
    /// The server ended the node's stream.
    Closed(String, Instant),
}

async fn sim_node(
    channel: Channel,
    id: String,
    slots: u32,
    mode: Mode,
    events: mpsc::UnboundedSender<Event>,
) {
    let (tx, rx) = mpsc::channel::<NodeMessage>(1024);
    let register = NodeMessage {
        msg: Some(node_message::Msg::Register(Register {
            node_id: id.clone(),
            capacity: Some(
                Capacity {
                    cpu_millis: 4000,
                    memory_mb: 8192,
                    gpus: 0,
                    fpga_slots: 0,
                    slots,
                }
                .into(),
            ),
            tags: vec!["cpu".into()],
            ..Register::default()
        })),
    };
    if tx.send(register).await.is_err() {
        return;
    }
    let mut client = OrderClient::new(channel);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Ok(v) = format!("Bearer {TOKEN}").parse() {
        req.metadata_mut().insert(ferry_core::AUTH_METADATA, v);
    }
    let Ok(resp) = client.attach(req).await else {
        let _ = events.send(Event::Closed(id, Instant::now()));
        return;
    };
    let mut inbound = resp.into_inner();
    let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hb_tx = tx.clone();
    let hb_silent = silent.clone();
    let heartbeat = tokio::spawn(async move {
        let mut seq = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if hb_silent.load(Ordering::Relaxed) {
                continue;
            }
            seq += 1;
            let hb = NodeMessage {
                msg: Some(node_message::Msg::Heartbeat(proto::Heartbeat {
                    seq,
                    ..Default::default()
                })),
            };
            if hb_tx.send(hb).await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(msg)) = inbound.next().await {
        match msg.msg {
            Some(server_message::Msg::Registered(_)) => {
                let _ = events.send(Event::Registered);
            }
            Some(server_message::Msg::Assignment(a)) => {
                let _ = events.send(Event::Assigned(id.clone(), Instant::now()));
                if mode == Mode::GoesSilent {
                    silent.store(true, Ordering::Relaxed);
                    continue;
                }
                let result = NodeMessage {
                    msg: Some(node_message::Msg::Result(TaskResult {
                        task_id: a.task_id,
                        attempt: a.attempt,
                        outcome: Outcome::Succeeded as i32,
                        output: b"ok".to_vec(),
                        ..TaskResult::default()
                    })),
                };
                if tx.send(result).await.is_err() {
                    break;
                }
            }
            _ => {}
        }
    }
    heartbeat.abort();
    let _ = events.send(Event::Closed(id, Instant::now()));
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .context("order-server URL")?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connect to the order-server")
}

async fn start_order_server(store: Arc<dyn Store>) -> anyhow::Result<ferry_order_server::Running> {
    ferry_order_server::start(
        ferry_order_server::Config {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            token: TOKEN.into(),
            cluster: CLUSTER.into(),
            ..Default::default()
        },
        store,
    )
    .await
    .context("start the order-server")
}

/// Counts committed final results: the tasks the finish-time keys list (one key per
/// group of commits).
async fn count_done(store: Arc<dyn Store>, want: usize) -> anyhow::Result<Instant> {
    let mut watch = store
        .watch(&keys::done_of(CLUSTER), 0)
        .await
        .context("watch results")?;
    let mut n = 0;
    while let Some(ev) = watch.next().await {
        let ev = ev.context("watch results")?;
        if ev.kind == ferry_store::EventKind::Put {
            n += keys::done_tasks(&ev.kv.key, &ev.kv.value).len();
            if n >= want {
                return Ok(Instant::now());
            }
        }
    }
    anyhow::bail!("the result watch ended after {n} of {want}")
}

/// CPU time this process has used (user + system), from `/proc/self/stat`; zero where
/// that cannot be read. On a shared machine whose speed drifts, CPU per task is the
/// steadier figure.
fn cpu_used() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses): utime and stime are the
    // 12th and 13th of them, in clock ticks (100 a second on Linux).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// One throughput run: returns (tasks/s, attach time of all nodes, CPU time this
/// process used while the tasks ran: order-server, store and simulated nodes).
async fn throughput(
    kind: &str,
    nodes: usize,
    tasks: usize,
    slots: u32,
) -> anyhow::Result<(f64, Duration, Duration)> {
    let bs = open(kind).await?;
    let os = start_order_server(bs.store.clone()).await?;
    enqueue(&bs.store, tasks).await?;
    let done = tokio::spawn(count_done(bs.store.clone(), tasks));
    let (etx, mut erx) = mpsc::unbounded_channel();
    let mut channels = vec![];
    for _ in 0..nodes.div_ceil(STREAMS_PER_CONNECTION) {
        channels.push(connect(&os.url).await?);
    }
    let started = Instant::now();
    let cpu_start = cpu_used();
    let mut handles = vec![];
    for i in 0..nodes {
        let ch = channels[i / STREAMS_PER_CONNECTION].clone();
        handles.push(tokio::spawn(sim_node(
            ch,
            format!("sim-{i:05}"),
            slots,
            Mode::Healthy,
            etx.clone(),
        )));
    }
    let mut registered = 0;
    let mut first = None;
    let mut attached = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(120);
    while registered < nodes && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), erx.recv()).await {
            Ok(Some(Event::Registered)) => {
                registered += 1;
                first.get_or_insert_with(Instant::now);
                if registered == nodes {
                    attached = started.elapsed();
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    anyhow::ensure!(
        registered == nodes,
        "only {registered} of {nodes} simulated nodes attached"
    );
    let finished = tokio::time::timeout(Duration::from_secs(600), done)
        .await
        .context("all results within 10 minutes")???;
    let took = finished.duration_since(first.unwrap_or(started));
    let cpu = cpu_used().saturating_sub(cpu_start);
    for h in handles {
        h.abort();
    }
    os.shutdown().await;
    Ok((tasks as f64 / took.as_secs_f64(), attached, cpu))
}

/// Failure detection: (last heartbeat → declared dead, dead → running elsewhere).
async fn detection(kind: &str) -> anyhow::Result<(Duration, Duration)> {
    let bs = open(kind).await?;
    let os = start_order_server(bs.store.clone()).await?;
    let ch = connect(&os.url).await?;
    let (etx, mut erx) = mpsc::unbounded_channel();
    // Ids sort so the silent node gets the task (placement ties go to the smallest).
    let victim = tokio::spawn(sim_node(
        ch.clone(),
        "a-silent".into(),
        4,
        Mode::GoesSilent,
        etx.clone(),
    ));
    let healthy = tokio::spawn(sim_node(
        ch,
        "b-healthy".into(),
        4,
        Mode::Healthy,
        etx.clone(),
    ));
    let mut registered = 0;
    while registered < 2 {
        match tokio::time::timeout(Duration::from_secs(10), erx.recv()).await {
            Ok(Some(Event::Registered)) => registered += 1,
            Ok(Some(_)) => {}
            _ => anyhow::bail!("the simulated nodes did not attach"),
        }
    }
    // Let a heartbeat or two pass, then queue one task.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    enqueue(&bs.store, 1).await?;
    let (mut silent_since, mut dead_at, mut elsewhere) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while elsewhere.is_none() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), erx.recv()).await {
            Ok(Some(Event::Assigned(node, at))) if node == "a-silent" => {
                silent_since = Some(at);
            }
            Ok(Some(Event::Closed(node, at))) if node == "a-silent" => dead_at = Some(at),
            Ok(Some(Event::Assigned(node, at))) if node == "b-healthy" => elsewhere = Some(at),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    victim.abort();
    healthy.abort();
    os.shutdown().await;
    match (silent_since, dead_at, elsewhere) {
        (Some(s), Some(d), Some(e)) => Ok((d.duration_since(s), e.saturating_duration_since(d))),
        _ => anyhow::bail!("the silent node's task did not move (events missing)"),
    }
}

pub async fn run(b: ScheduleBench) -> anyhow::Result<ExitCode> {
    println!("ferry bench schedule — {}", crate::bench::machine());
    println!(
        "simulated node agents over the real gRPC protocol, {} slots each, completing at once; {} tasks queued before the nodes attach",
        b.slots, b.tasks
    );
    for kind in &b.stores {
        let floor = store_floor(kind, b.tasks)
            .await
            .with_context(|| format!("the store baseline on {kind}"))?;
        println!(
            "{kind:<9} baseline: {floor:>9.0} tasks/s — the same store transactions per task, issued alone (no scheduling, gRPC or nodes)"
        );
        for &n in &b.nodes {
            let (rate, attach, cpu) = throughput(kind, n, b.tasks, b.slots)
                .await
                .with_context(|| format!("run on {kind} with {n} nodes"))?;
            println!(
                "{kind:<9} {n:>6} nodes: {rate:>9.0} tasks/s placed and committed, {:.2}× the baseline  (all nodes attached in {:.2} s; {:.0} µs of CPU per task in this process{})",
                rate / floor,
                attach.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / b.tasks as f64,
                if kind == "etcd" {
                    ", etcd's own not counted"
                } else {
                    ""
                }
            );
        }
        let (detect, replace) = detection(kind)
            .await
            .with_context(|| format!("failure detection on {kind}"))?;
        println!(
            "{kind:<9} failure detection: a node that went silent with a task is dead {:.2} s later (suspect at 3 s, dead at 5 s of silence, heartbeats every 1 s); its task reached another node {:.0} ms after that",
            detect.as_secs_f64(),
            replace.as_secs_f64() * 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
