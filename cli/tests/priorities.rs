//! Priorities under a capacity drop, on a whole in-process cluster: with half the nodes
//! gone and a backlog of batch work queued first, critical tasks submitted afterwards
//! still start right away (ahead of the batch backlog) while batch tasks wait.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ferry_sdk::client::{Client, SubmitOptions};

/// Each task holds 1,000 of a node's 2,000 millicores for 0.4 s: two at once per node.
const SCRIPT: &str = "#!/bin/sh\nsleep 0.4\nprintf ok\n";
const LIMITS: &str = "[limits]\ncpu_millis = 1000\ntimeout_ms = 20000\n";

fn opts(priority: &str) -> SubmitOptions {
    SubmitOptions {
        priority: Some(priority.into()),
        ..SubmitOptions::default()
    }
}

/// Queue time (first attempt's start − creation) of each task, in ms.
async fn queue_times(client: &Client, ids: &[String]) -> Vec<u64> {
    let mut out = vec![];
    for id in ids {
        let t = client.wait(id, Duration::from_secs(120)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        let started = t["attempts"][0]["started_ms"].as_u64().unwrap();
        out.push(started.saturating_sub(t["created_ms"].as_u64().unwrap()));
    }
    out.sort_unstable();
    out
}

fn median(v: &[u64]) -> u64 {
    v[v.len() / 2]
}

/// Submits `batch` batch tasks, then `critical` critical ones; returns both id lists.
async fn mixed_load(client: &Client, batch: usize, critical: usize) -> (Vec<String>, Vec<String>) {
    let mut b = vec![];
    for _ in 0..batch {
        b.push(
            client
                .submit("work", b"{}".to_vec(), &opts("batch"))
                .await
                .unwrap(),
        );
    }
    let mut c = vec![];
    for _ in 0..critical {
        c.push(
            client
                .submit("work", b"{}".to_vec(), &opts("critical"))
                .await
                .unwrap(),
        );
    }
    (b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halving_the_nodes_keeps_critical_work_flowing_while_batch_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, client) = common::start_cluster(dir.path(), 4).await;
    client
        .deploy("work", common::native_package("work", SCRIPT, LIMITS))
        .await
        .unwrap();

    // Full capacity (4 nodes × 2 slots = 8): the mixed load barely queues.
    let (b1, c1) = mixed_load(&client, 16, 4).await;
    let batch_full = queue_times(&client, &b1).await;
    let critical_full = queue_times(&client, &c1).await;

    // Half the nodes gone (4 slots) and a batch backlog twice as deep, queued first.
    cluster.stop_node(3).await;
    cluster.stop_node(2).await;
    let (b2, c2) = mixed_load(&client, 32, 4).await;
    let critical_half = queue_times(&client, &c2).await;
    let batch_half = queue_times(&client, &b2).await;
    println!(
        "median queue ms — full: critical {} batch {}; half: critical {} batch {}",
        median(&critical_full),
        median(&batch_full),
        median(&critical_half),
        median(&batch_half)
    );

    // Critical tasks, though submitted after 32 batch tasks, start as soon as a slot
    // frees: within about one task's run (0.4 s) plus claim latency, never behind the
    // backlog, which takes 32 / 4 × 0.4 s = 3.2 s to drain.
    let worst_critical = *critical_half.last().unwrap();
    assert!(
        worst_critical < 1500,
        "critical tasks waited {critical_half:?} ms with half the nodes"
    );
    // ... and the batch work is what waits.
    assert!(
        median(&batch_half) > 2 * worst_critical.max(200),
        "batch median {} ms vs critical worst {worst_critical} ms",
        median(&batch_half)
    );
    cluster.shutdown().await;
}
