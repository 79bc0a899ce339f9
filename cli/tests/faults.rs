//! Fault test (real processes, real etcd, loopback only, bounded): 1,000 async tasks
//! survive kill -9 of an order-server, kill -9 of a node agent, and a SIGSTOP of the
//! other order-server past its lease. Every task ends succeeded, with its result
//! committed exactly once; re-executions (at-least-once) are counted and printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, free_port};
use ferry_sdk::client::{Client, SubmitOptions};

const TOKEN: &str = "fault-token";
const TASKS: usize = 1000;

fn component(name: &str, store: &str, args: &[&str]) -> Proc {
    common::component(name, store, TOKEN, args)
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {}", p.name);
}

async fn count(client: &Client, state: &str) -> usize {
    client
        .get_json(&format!("/v1/tasks?state={state}&limit=1000"))
        .await
        .map(|v| v["tasks"].as_array().map(|a| a.len()).unwrap_or(0))
        .unwrap_or(0)
}

async fn wait_until_succeeded(client: &Client, n: usize, timeout: Duration) -> bool {
    common::eventually_every(timeout, Duration::from_millis(500), || async {
        count(client, "succeeded").await >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_survive_kills_and_a_paused_order_server() {
    let etcd = ferry_store::testing::EtcdServer::start().expect("start etcd");
    let store = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let gw = format!("127.0.0.1:{}", free_port());

    let _scheduler = component("cluster-scheduler", &store, &[]);
    let _gateway = component(
        "gateway",
        &store,
        &["--listen", &gw, "--data-dir", &d("gw")],
    );
    let os_a = component(
        "order-server",
        &store,
        &["--listen", "127.0.0.1:0", "--id", "os-a"],
    );
    let mut os_b = component(
        "order-server",
        &store,
        &["--listen", "127.0.0.1:0", "--id", "os-b"],
    );
    let nodes: Vec<Proc> = (1..=3)
        .map(|i| {
            component(
                "order-client",
                &store,
                &[
                    "--id",
                    &format!("n{i}"),
                    "--data-dir",
                    &d(&format!("n{i}")),
                    "--slots",
                    "4",
                ],
            )
        })
        .collect();

    let client = Client::new(format!("http://{gw}"), Some(TOKEN.into()));
    let attached = common::eventually(Duration::from_secs(30), || async {
        client.get_json("/v1/nodes").await.is_ok_and(|v| {
            v["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().filter(|n| n["recorded"] == "attached").count() == 3)
        })
    })
    .await;
    assert!(attached, "three node agents attach");

    // A function slow enough that work is in flight when the faults hit.
    let pkg = common::native_package(
        "echo",
        "#!/bin/sh\nread -r x\nsleep 0.3\nprintf '{\"echo\":%s}' \"$x\"\n",
        "[limits]\ncpu_millis = 10\nmemory_mb = 64\ntimeout_ms = 10000\n",
    );
    client.deploy("echo", pkg).await.expect("deploy");

    // Submit from 8 callers in the background while the faults happen.
    let started = Instant::now();
    let submitters: Vec<_> = (0..8)
        .map(|k| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut mine = vec![];
                for i in (k..TASKS).step_by(8) {
                    let id = client
                        .submit(
                            "echo",
                            format!("{i}\n").into_bytes(),
                            &SubmitOptions::default(),
                        )
                        .await
                        .expect("submit");
                    mine.push((i, id));
                }
                mine
            })
        })
        .collect();

    // Faults, each once some progress has been made.
    assert!(
        wait_until_succeeded(&client, 100, Duration::from_secs(120)).await,
        "progress before the first fault"
    );
    let mut os_a = os_a;
    os_a.child.kill().unwrap(); // SIGKILL
    os_a.child.wait().unwrap();
    println!("t={:.1}s kill -9 os-a", started.elapsed().as_secs_f64());

    assert!(
        wait_until_succeeded(&client, 300, Duration::from_secs(120)).await,
        "progress after losing os-a"
    );
    let mut nodes = nodes;
    let mut n1 = nodes.remove(0);
    n1.child.kill().unwrap();
    n1.child.wait().unwrap();
    println!("t={:.1}s kill -9 n1", started.elapsed().as_secs_f64());

    assert!(
        wait_until_succeeded(&client, 500, Duration::from_secs(120)).await,
        "progress after losing n1"
    );
    signal(&os_b, "-STOP");
    println!("t={:.1}s SIGSTOP os-b", started.elapsed().as_secs_f64());
    // Past its 10 s lease: its registration expires, its incarnation is over.
    tokio::time::sleep(Duration::from_secs(13)).await;
    signal(&os_b, "-CONT");
    println!("t={:.1}s SIGCONT os-b", started.elapsed().as_secs_f64());

    let mut ids = vec![String::new(); TASKS];
    for s in submitters {
        for (i, id) in s.await.unwrap() {
            ids[i] = id;
        }
    }
    println!(
        "t={:.1}s all {TASKS} submitted",
        started.elapsed().as_secs_f64()
    );
    let finished = common::eventually_every(
        Duration::from_secs(240),
        Duration::from_millis(500),
        || async {
            let v = client.get_json("/v1/tasks?limit=1000").await.unwrap();
            v["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| !matches!(t["state"].as_str(), Some("queued" | "running")))
        },
    )
    .await;
    println!(
        "t={:.1}s all tasks final: {finished}",
        started.elapsed().as_secs_f64()
    );

    let mut reruns = 0;
    let mut attempts_total = 0;
    for (i, id) in ids.iter().enumerate() {
        let t = client.task(id).await.unwrap();
        assert_eq!(t["state"], "succeeded", "task {i} must not be lost: {t}");
        assert_eq!(t["output"]["echo"], i, "task {i} carries its own result");
        let attempts = t["attempts"].as_array().unwrap();
        let wins = attempts
            .iter()
            .filter(|a| a["outcome"] == "succeeded")
            .count();
        assert_eq!(wins, 1, "exactly one committed success for task {i}: {t}");
        attempts_total += attempts.len();
        if attempts.len() > 1 {
            reruns += 1;
        }
    }
    println!(
        "{TASKS} tasks succeeded in {:.1} s · {attempts_total} attempts · {reruns} tasks ran more than once (at-least-once re-executions)",
        started.elapsed().as_secs_f64()
    );
    let store_handle = ferry_store::open(&store).await.unwrap();
    assert!(
        store_handle
            .range(ferry_core::keys::QUEUE)
            .await
            .unwrap()
            .kvs
            .is_empty(),
        "nothing left queued or claimed"
    );
    drop(os_b.child.kill());
}

/// A node agent paused (SIGSTOP) while it runs a task: the order-server stops placing
/// on it once it is suspect (3 s of silence), declares it dead at 5 s and runs the task
/// elsewhere; when the node wakes up, its late result for the old attempt changes
/// nothing, and it attaches again as a healthy node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_suspect_then_dead_and_its_task_runs_elsewhere() {
    let etcd = ferry_store::testing::EtcdServer::start().expect("start etcd");
    let store = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let gw = format!("127.0.0.1:{}", free_port());
    let _scheduler = component("cluster-scheduler", &store, &[]);
    let _gateway = component(
        "gateway",
        &store,
        &["--listen", &gw, "--data-dir", &d("gw")],
    );
    let _os = component("order-server", &store, &["--listen", "127.0.0.1:0"]);
    let nodes: Vec<Proc> = (1..=2)
        .map(|i| {
            component(
                "order-client",
                &store,
                &["--id", &format!("n{i}"), "--data-dir", &d(&format!("n{i}"))],
            )
        })
        .collect();
    let client = Client::new(format!("http://{gw}"), Some(TOKEN.into()));
    let node_states = || async {
        client
            .get_json("/v1/nodes")
            .await
            .map(|v| v["nodes"].as_array().cloned().unwrap_or_default())
            .unwrap_or_default()
    };
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            node_states()
                .await
                .iter()
                .filter(|n| n["state"] == "ready")
                .count()
                == 2
        })
        .await,
        "two nodes attach"
    );
    let pkg = common::native_package(
        "slow",
        "#!/bin/sh\nsleep 2\nprintf done\n",
        "[limits]\ntimeout_ms = 20000\n",
    );
    client.deploy("slow", pkg).await.expect("deploy");
    let id = client
        .submit("slow", b"{}".to_vec(), &SubmitOptions::default())
        .await
        .unwrap();
    let mut first_node = String::new();
    for _ in 0..100 {
        let t = client.task(&id).await.unwrap();
        if t["state"] == "running" {
            first_node = t["attempts"][0]["node"].as_str().unwrap().to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!first_node.is_empty(), "the task starts");
    let idx: usize = if first_node == "n1" { 0 } else { 1 };
    let paused_at = Instant::now();
    signal(&nodes[idx], "-STOP");

    // Suspect first (no new work), then dead: gone from the live view, recorded dead.
    let mut suspect_after = None;
    let mut dead_after = None;
    for _ in 0..200 {
        let list = node_states().await;
        let me = list.iter().find(|n| n["id"] == first_node.as_str());
        if suspect_after.is_none() && me.is_some_and(|n| n["state"] == "suspect") {
            suspect_after = Some(paused_at.elapsed());
        }
        if me.is_some_and(|n| n["recorded"] == "dead" && n.get("breaker").is_none()) {
            dead_after = Some(paused_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let detected = dead_after.is_some();
    assert!(detected, "the paused node is declared dead");
    assert!(suspect_after.is_some(), "it was suspect before it was dead");
    let t = client.wait(&id, Duration::from_secs(30)).await.unwrap();
    let ran_again_after = paused_at.elapsed();
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(
        t["output_base64"], "ZG9uZQ==",
        "the output is \"done\": {t}"
    );
    let last = t["attempts"].as_array().unwrap().last().unwrap().clone();
    assert_ne!(last["node"], first_node.as_str(), "{t}");
    let attempts = t["attempts"].as_array().unwrap();
    let replaced_ms = attempts[1]["started_ms"].as_u64().unwrap() as i64
        - attempts[0]["finished_ms"].as_u64().unwrap() as i64;
    println!(
        "paused {first_node}: suspect after {:?}, dead after {:?}, re-placed {replaced_ms} ms after the failover, task done elsewhere after {ran_again_after:?}",
        suspect_after.unwrap(),
        dead_after.unwrap()
    );

    // The node wakes up: it attaches again and its stale result changes nothing.
    signal(&nodes[idx], "-CONT");
    assert!(
        common::eventually(Duration::from_secs(20), || async {
            node_states()
                .await
                .iter()
                .any(|n| n["id"] == first_node.as_str() && n["state"] == "ready")
        })
        .await,
        "the node comes back"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = client.task(&id).await.unwrap();
    assert_eq!(
        again["attempts"], t["attempts"],
        "the late result changed nothing"
    );
    assert_eq!(again["state"], "succeeded");
}
