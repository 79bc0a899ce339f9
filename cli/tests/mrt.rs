//! Queues' MRT (max running tasks) and fairness between queues, on a whole in-process
//! cluster: a queue held to 2 running tasks gets a flood of 20 slow tasks, and a second
//! queue's tasks, queued behind the flood, still start at once while the first queue
//! never runs more than 2.
//!
//! The tasks are written into the store the way the gateway writes them (task record and
//! queue entry in one transaction, the entry naming the task's queue), and the queue
//! record as an operator's would be: this is the order-server's side of queues.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ferry_core::keys;
use ferry_core::model::{QueueRecord, VersionRecord};
use ferry_core::task::{Priority, QueueEntry, TaskRecord};
use ferry_store::{Op, Store, Txn};

/// 250 of a node's millicores for 0.6 s each: the node runs 8 at once (2 CPUs here),
/// more where it has more.
const SCRIPT: &str = "#!/bin/sh\nsleep 0.6\nprintf ok\n";
const LIMITS: &str = "[limits]\ncpu_millis = 250\ntimeout_ms = 20000\n";
const CLUSTER: &str = "local";

async fn queue_tasks(
    store: &Arc<dyn Store>,
    version: &VersionRecord,
    queue: &str,
    n: usize,
) -> Vec<String> {
    let now = ferry_core::now_ms();
    let mut txn = Txn::new();
    let mut ids = vec![];
    for _ in 0..n {
        let id = ferry_core::id::new_id();
        let mut t = TaskRecord::new(
            id.clone(),
            version.clone(),
            CLUSTER.into(),
            Priority::Normal,
            b"{}".to_vec(),
            now,
        );
        t.queue = queue.into();
        txn = txn
            .then(Op::put(keys::task(&id), serde_json::to_vec(&t).unwrap()))
            .then(Op::put(
                keys::queued(CLUSTER, &id),
                serde_json::to_vec(&t.queue_entry()).unwrap(),
            ));
        ids.push(id);
    }
    assert!(store.txn(txn).await.unwrap().succeeded);
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_queue_is_held_to_its_mrt_and_another_queue_still_runs_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = common::start_cluster(dir.path(), 1).await;
    client
        .deploy("work", common::native_package("work", SCRIPT, LIMITS))
        .await
        .unwrap();
    let store = cluster.store.clone();
    let kv = store.get(&keys::version("work", 1)).await.unwrap().unwrap();
    let version: VersionRecord = serde_json::from_slice(&kv.value).unwrap();
    let record = QueueRecord {
        mrt: Some(2),
        ..QueueRecord::implicit("flood")
    };
    store
        .put(
            &keys::queue_def("flood"),
            serde_json::to_vec(&record).unwrap(),
            0,
        )
        .await
        .unwrap();

    // Watch the claim marks (written on the queue entry by the claim, gone with the
    // commit) of the flooded queue's tasks for as long as the test runs.
    let flood: Arc<std::sync::Mutex<HashSet<String>>> = Default::default();
    let most = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (store, flood, most, stop) = (store.clone(), flood.clone(), most.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let queue = store.range(&keys::queue_of(CLUSTER)).await.unwrap();
                let flood = flood.lock().unwrap().clone();
                let n = queue
                    .kvs
                    .iter()
                    .filter(|kv| flood.contains(kv.key.rsplit('/').next().unwrap()))
                    .filter(|kv| {
                        serde_json::from_slice::<QueueEntry>(&kv.value)
                            .unwrap()
                            .claim
                            .is_some()
                    })
                    .count();
                most.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let slow = queue_tasks(&store, &version, "flood", 20).await;
    flood.lock().unwrap().extend(slow.iter().cloned());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queued after the whole flood: in plain queue order they would wait for it.
    let fast = queue_tasks(&store, &version, "other", 4).await;

    let mut fast_waits = vec![];
    for id in &fast {
        let t = client.wait(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        let started = t["attempts"][0]["started_ms"].as_u64().unwrap();
        fast_waits.push(started.saturating_sub(t["created_ms"].as_u64().unwrap()));
    }
    let mut slow_starts = vec![];
    for id in &slow {
        let t = client.wait(id, Duration::from_secs(120)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        slow_starts.push(t["attempts"][0]["started_ms"].as_u64().unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    monitor.await.unwrap();
    slow_starts.sort_unstable();
    let spread = slow_starts.last().unwrap() - slow_starts.first().unwrap();
    let most = most.load(Ordering::Relaxed);
    println!(
        "other queue waited {fast_waits:?} ms; flood: at most {most} running, starts spread over {spread} ms"
    );

    assert!(most <= 2, "the flooded queue ran {most} tasks at once");
    assert!(most >= 1, "the monitor saw the flood run");
    // 20 tasks of 0.6 s, two at a time: ten rounds, the last starting ≥ 5.4 s after the first.
    assert!(spread >= 5000, "flood starts spread over only {spread} ms");
    // The other queue did not wait for the flood (which, unlimited, would have held
    // every slot for at least two rounds, 1.2 s).
    let worst = *fast_waits.iter().max().unwrap();
    assert!(worst < 1000, "the other queue waited {fast_waits:?} ms");
    cluster.shutdown().await;
}
