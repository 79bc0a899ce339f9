//! Idempotency keys across two gateway processes (and a restart) on one etcd: a repeat
//! returns the first call's answer or attaches to it while it runs, the function runs
//! once, and a repeat with another body is 409. Sync invocations and async tasks alike.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Proc, free_port};
use ferry_sdk::client::Client;

const TOKEN: &str = "idem-token";

struct Answer {
    status: u16,
    replay: Option<String>,
    version: Option<String>,
    body: Vec<u8>,
}

async fn post(gw: &str, path: &str, key: &str, body: &str) -> Answer {
    post_as(TOKEN, gw, path, key, body).await
}

async fn post_as(token: &str, gw: &str, path: &str, key: &str, body: &str) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{gw}{path}"))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let h = |k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (replay, version) = (h("x-ferry-idempotency"), h("x-ferry-version"));
    Answer {
        status: r.status().as_u16(),
        replay,
        version,
        body: r.bytes().await.unwrap().to_vec(),
    }
}

fn gateway(store: &str, port: u16, dir: &std::path::Path) -> Proc {
    common::component(
        "gateway",
        store,
        TOKEN,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &dir.display().to_string(),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_repeats_hold_across_two_gateways_and_a_restart() {
    let etcd = ferry_store::testing::EtcdServer::start().expect("start etcd");
    let store = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let _scheduler = common::component("cluster-scheduler", &store, TOKEN, &[]);
    let _os = common::component("order-server", &store, TOKEN, &["--listen", "127.0.0.1:0"]);
    let (p1, p2) = (free_port(), free_port());
    // Both gateways share one package folder, as replicas behind one volume would.
    let mut gw1 = gateway(&store, p1, &dir.path().join("gw"));
    let _gw2 = gateway(&store, p2, &dir.path().join("gw"));
    let (g1, g2) = (
        format!("http://127.0.0.1:{p1}"),
        format!("http://127.0.0.1:{p2}"),
    );
    let _node = common::component(
        "order-client",
        &store,
        TOKEN,
        &[
            "--id",
            "node-a",
            "--data-dir",
            &dir.path().join("node").display().to_string(),
        ],
    );
    let c1 = Client::new(&g1, Some(TOKEN.into()));
    let c2 = Client::new(&g2, Some(TOKEN.into()));
    let ready = common::eventually(Duration::from_secs(30), || async {
        for c in [&c1, &c2] {
            let ok = c
                .get_json("/v1/clusters")
                .await
                .is_ok_and(|v| v["clusters"][0]["order_servers"][0]["nodes"].as_u64() == Some(1));
            if !ok {
                return false;
            }
        }
        true
    })
    .await;
    assert!(ready, "both gateways route to the node");

    // A function that counts its runs, says it started, and waits to be released.
    let gate = tempfile::tempdir().unwrap();
    let g = gate.path().display();
    let script = format!(
        "#!/bin/sh\necho run >> {g}/runs\ntouch {g}/started\ni=0\nwhile [ ! -f {g}/release ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\ncat\n"
    );
    c1.deploy(
        "gated",
        common::native_package("gated", &script, "[limits]\ntimeout_ms = 60000\n"),
    )
    .await
    .unwrap();
    let runs = || {
        std::fs::read_to_string(gate.path().join("runs"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let invoke = "/v1/functions/gated/invoke";

    // A repeat on the other gateway while the first call runs attaches to it.
    let first = tokio::spawn({
        let g1 = g1.clone();
        async move { post(&g1, invoke, "k-sync", r#"{"n":1}"#).await }
    });
    let started = common::eventually(Duration::from_secs(30), || async {
        gate.path().join("started").exists()
    })
    .await;
    assert!(started, "the first call runs");
    let second = tokio::spawn({
        let g2 = g2.clone();
        async move { post(&g2, invoke, "k-sync", r#"{"n":1}"#).await }
    });
    // Another body under the same key is refused, even while the first runs.
    let other = post(&g2, invoke, "k-sync", r#"{"n":2}"#).await;
    assert_eq!(
        other.status,
        409,
        "{}",
        String::from_utf8_lossy(&other.body)
    );
    std::fs::write(gate.path().join("release"), b"").unwrap();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(first.body, br#"{"n":1}"#);
    assert_eq!(second.body, first.body, "the same answer");
    assert_eq!(first.replay, None, "the first call is not a repeat");
    assert!(
        matches!(second.replay.as_deref(), Some("attached" | "replayed")),
        "{:?}",
        second.replay
    );
    assert_eq!(
        second.version.as_deref(),
        Some("1"),
        "the repeat names the version"
    );
    assert_eq!(runs(), 1, "the function ran once");

    // After a restart of the first gateway, a repeat gets the stored answer.
    drop(gw1);
    gw1 = gateway(&store, p1, &dir.path().join("gw"));
    let back = common::eventually(Duration::from_secs(20), || async {
        c1.get_json("/v1/functions").await.is_ok()
    })
    .await;
    assert!(back, "the gateway restarts");
    let again = post(&g1, invoke, "k-sync", r#"{"n":1}"#).await;
    assert_eq!(
        (again.status, again.replay.as_deref(), again.body.as_slice()),
        (200, Some("replayed"), br#"{"n":1}"#.as_slice())
    );
    let other = post(&g1, invoke, "k-sync", r#"{"n":2}"#).await;
    assert_eq!(other.status, 409);
    assert_eq!(runs(), 1, "still once");
    // A new key runs again.
    let fresh = post(&g2, invoke, "k-other", r#"{"n":3}"#).await;
    assert_eq!((fresh.status, fresh.replay), (200, None));
    assert_eq!(runs(), 2);

    // Async: the same key on either gateway is the same task.
    let tasks = "/v1/functions/gated/tasks";
    let a = post(&g1, tasks, "k-async", r#"{"n":4}"#).await;
    let b = post(&g2, tasks, "k-async", r#"{"n":4}"#).await;
    assert_eq!((a.status, b.status), (202, 202));
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&a.body).unwrap(),
        serde_json::from_slice(&b.body).unwrap(),
    );
    assert_eq!(a["task_id"], b["task_id"], "{a} {b}");
    assert_eq!(
        (
            a["idempotent_replay"].as_bool(),
            b["idempotent_replay"].as_bool()
        ),
        (Some(false), Some(true))
    );
    assert_eq!(b["version"], 1, "{b}");
    assert_eq!(post(&g2, tasks, "k-async", r#"{"n":5}"#).await.status, 409);
    let done = c2
        .wait(a["task_id"].as_str().unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done["output"]["n"], 4, "{done}");
    assert_eq!(runs(), 3, "the task ran once");
    drop(gw1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_reruns_past_their_window_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, admin) = common::start_cluster(dir.path(), 1).await;
    admin
        .deploy("hello", common::hello_package().1)
        .await
        .unwrap();
    let url = &cluster.url;
    let a = post_as(
        "test-token",
        url,
        "/v1/functions/hello/tasks",
        "k-a",
        r#"{"name":"a"}"#,
    )
    .await;
    assert_eq!(a.status, 202);
    let a: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(
        post_as(
            "test-token",
            url,
            "/v1/functions/hello/invoke",
            "k-s",
            r#"{"name":"s"}"#
        )
        .await
        .status,
        200
    );
    admin
        .wait(a["task_id"].as_str().unwrap(), Duration::from_secs(30))
        .await
        .unwrap();
    let rerun = admin
        .post_json("/v1/reruns", &serde_json::json!({ "function": "hello" }))
        .await
        .unwrap();
    let rerun_url = format!("/v1/reruns/{}", rerun["id"].as_str().unwrap());

    // Within their windows nothing goes.
    let store = cluster.store.as_ref();
    let day = Duration::from_secs(24 * 3600);
    use ferry_gateway::sweep::sweep;
    assert_eq!(
        sweep(store, ferry_core::keys::IDEMPOTENCY, day)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        sweep(store, ferry_core::keys::RERUNS, day).await.unwrap(),
        0
    );
    let again = post_as(
        "test-token",
        url,
        "/v1/functions/hello/tasks",
        "k-a",
        r#"{"name":"a"}"#,
    )
    .await;
    let again: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(again["task_id"], a["task_id"], "still the same task");

    // Past them: both idempotency entries and the re-run are removed ...
    tokio::time::sleep(Duration::from_millis(5)).await;
    let zero = Duration::ZERO;
    assert_eq!(
        sweep(store, ferry_core::keys::IDEMPOTENCY, zero)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        sweep(store, ferry_core::keys::RERUNS, zero).await.unwrap(),
        1
    );
    assert!(matches!(
        admin.get_json(&rerun_url).await,
        Err(ferry_sdk::client::ClientError::Api { status: 404, .. })
    ));
    // ... and the key is free again: a new task.
    let fresh = post_as(
        "test-token",
        url,
        "/v1/functions/hello/tasks",
        "k-a",
        r#"{"name":"a"}"#,
    )
    .await;
    let fresh: serde_json::Value = serde_json::from_slice(&fresh.body).unwrap();
    assert_ne!(fresh["task_id"], a["task_id"]);
    assert_eq!(fresh["idempotent_replay"], false);
    cluster.shutdown().await;
}
