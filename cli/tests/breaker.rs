//! Circuit breaking and operator control on a whole in-process cluster: a node that
//! fails a function is ejected for it and stops receiving that work; after its
//! ejection a single probe decides, and a good probe brings it back. Drain and restore
//! by hand through the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{native_package, start_cluster_tuned};
use ferry_sdk::client::Client;
use serde_json::Value;

/// Fails on node-1 while `mark` exists (scratch directories live under the node's own
/// cache folder), succeeds everywhere else.
fn flaky_script(mark: &std::path::Path) -> String {
    format!(
        "#!/bin/sh\ncase \"$PWD\" in */nodes/node-1/*) if [ -e '{}' ]; then echo 'disk on fire' >&2; exit 1; fi;; esac\nprintf ok\n",
        mark.display()
    )
}

async fn nodes(client: &Client) -> Vec<Value> {
    client.get_json("/v1/nodes").await.unwrap()["nodes"]
        .as_array()
        .cloned()
        .unwrap()
}

fn node<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter().find(|n| n["id"] == id).unwrap()
}

/// Invokes `flaky` once: (node that ran it, succeeded).
async fn invoke(client: &Client) -> (String, bool) {
    match client.invoke("flaky", b"{}".to_vec()).await {
        Ok(inv) => (inv.node.unwrap_or_default(), true),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("disk on fire"), "{text}");
            ("node-1".to_string(), false)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_node_is_ejected_for_the_function_and_returns_after_a_probe() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("node-1-is-broken");
    std::fs::write(&mark, b"").unwrap();
    let mut tuning = ferry_cli::up::Tuning::default();
    tuning.breaker.consecutive = 3;
    tuning.breaker.base_ejection = Duration::from_millis(1500);
    tuning.breaker.jitter = 0.0;
    let (cluster, client) = start_cluster_tuned(&dir.path().join("data"), 3, tuning).await;
    client
        .deploy("flaky", native_package("flaky", &flaky_script(&mark), ""))
        .await
        .unwrap();

    // Idle nodes tie on load, so placement goes to node-1 (smallest id) until its
    // breaker for `flaky` opens after 3 failures in a row; then never again.
    let mut failures = 0;
    let mut ran_on = vec![];
    for _ in 0..30 {
        let (node, ok) = invoke(&client).await;
        if !ok {
            failures += 1;
        }
        ran_on.push(node);
    }
    assert_eq!(failures, 3, "{ran_on:?}");
    assert!(
        ran_on[3..].iter().all(|n| n != "node-1"),
        "an ejected node gets no work: {ran_on:?}"
    );
    let list = nodes(&client).await;
    let n1 = node(&list, "node-1");
    assert_eq!(n1["state"], "ready", "the node itself is fine: {n1}");
    assert_eq!(n1["function_breakers"][0]["function"], "flaky", "{n1}");
    assert_eq!(n1["function_breakers"][0]["state"], "open", "{n1}");
    assert_eq!(n1["function_breakers"][0]["ejections"], 1, "{n1}");

    // Still broken when the ejection ends: the probe fails and the node is ejected
    // again, for twice as long.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (node_id, ok) = invoke(&client).await;
    assert_eq!(
        (node_id.as_str(), ok),
        ("node-1", false),
        "the probe ran on node-1"
    );
    let list = nodes(&client).await;
    assert_eq!(
        node(&list, "node-1")["function_breakers"][0]["ejections"],
        2
    );
    for _ in 0..5 {
        assert_ne!(invoke(&client).await.0, "node-1");
    }

    // Repaired: after the (3 s) ejection the probe succeeds and node-1 is back.
    std::fs::remove_file(&mark).unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (node_id, ok) = invoke(&client).await;
    assert_eq!((node_id.as_str(), ok), ("node-1", true));
    let list = nodes(&client).await;
    assert_eq!(
        node(&list, "node-1")["function_breakers"],
        serde_json::json!([]),
        "closed again"
    );
    assert_eq!(invoke(&client).await, ("node-1".to_string(), true));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_and_ejected_nodes_get_no_work_until_restored() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) =
        start_cluster_tuned(&dir.path().join("data"), 2, Default::default()).await;
    let mark = dir.path().join("never");
    client
        .deploy("flaky", native_package("flaky", &flaky_script(&mark), ""))
        .await
        .unwrap();
    assert_eq!(invoke(&client).await, ("node-1".to_string(), true));

    let v = client
        .post_json(
            "/v1/nodes/node-1/drain?reason=kernel%20upgrade",
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(v["admin"], "draining");
    // Every order-server hears of it through the store; then no work goes there.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            node(&nodes(&client).await, "node-1")["state"] == "draining"
        })
        .await
    );
    for _ in 0..10 {
        assert_eq!(invoke(&client).await.0, "node-2");
    }
    client
        .post_json("/v1/nodes/node-2/eject", &serde_json::json!({}))
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            node(&nodes(&client).await, "node-2")["state"] == "disabled"
        })
        .await
    );
    let err = client.invoke("flaky", b"{}".to_vec()).await.unwrap_err();
    assert!(
        err.to_string().contains("no attached node has room"),
        "{err}"
    );

    for id in ["node-1", "node-2"] {
        let v = client
            .post_json(&format!("/v1/nodes/{id}/restore"), &serde_json::json!({}))
            .await
            .unwrap();
        assert_eq!(v["admin"], "active");
    }
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            nodes(&client).await.iter().all(|n| n["state"] == "ready")
        })
        .await
    );
    assert_eq!(invoke(&client).await, ("node-1".to_string(), true));

    // Bad input: an unknown node or action is a 404 and writes nothing.
    let e = client
        .post_json("/v1/nodes/nope/drain", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("not_found") || e.to_string().contains("no node"),
        "{e}"
    );
    let e = client
        .post_json("/v1/nodes/node-1/explode", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("drain, eject or restore"), "{e}");
    let admin = cluster
        .store
        .range(ferry_core::keys::NODE_ADMIN)
        .await
        .unwrap();
    assert_eq!(admin.kvs.len(), 2, "only node-1 and node-2 have settings");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_outlasts_the_node_reconnecting_and_an_operator_restore_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("node-1-is-broken");
    std::fs::write(&mark, b"").unwrap();
    let mut tuning = ferry_cli::up::Tuning::default();
    tuning.breaker.consecutive = 3;
    tuning.breaker.base_ejection = Duration::from_secs(60);
    tuning.breaker.jitter = 0.0;
    let (mut cluster, client) = start_cluster_tuned(&dir.path().join("data"), 2, tuning).await;
    client
        .deploy("flaky", native_package("flaky", &flaky_script(&mark), ""))
        .await
        .unwrap();
    let mut failures = 0;
    for _ in 0..10 {
        if !invoke(&client).await.1 {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "node-1 is ejected for flaky after 3 failures");
    // The ejection is in node-1's record, for whichever attachment comes next.
    let recorded = common::eventually(Duration::from_secs(5), || async {
        let kvs = cluster
            .store
            .range(ferry_core::keys::NODES)
            .await
            .unwrap()
            .kvs;
        kvs.iter().any(|kv| {
            let r: ferry_core::model::NodeRecord = serde_json::from_slice(&kv.value).unwrap();
            r.id == "node-1"
                && r.function_breakers
                    .get("flaky")
                    .is_some_and(|b| b.ejections == 1 && b.until_ms > ferry_core::now_ms())
        })
    })
    .await;
    assert!(recorded, "the ejection is recorded");

    // node-1's agent goes away and comes back: its stream closes, a new one attaches.
    cluster.restart_node(0).await.unwrap();
    let back = common::eventually(Duration::from_secs(15), || async {
        let list = nodes(&client).await;
        list.iter()
            .any(|n| n["id"] == "node-1" && n["state"] == "ready")
    })
    .await;
    assert!(back, "node-1 attached again");
    let list = nodes(&client).await;
    let n1 = node(&list, "node-1");
    assert_eq!(n1["function_breakers"][0]["function"], "flaky", "{n1}");
    assert_eq!(
        n1["function_breakers"][0]["state"], "open",
        "still ejected: {n1}"
    );
    assert_eq!(n1["function_breakers"][0]["ejections"], 1, "{n1}");
    for _ in 0..8 {
        assert_eq!(
            invoke(&client).await,
            ("node-2".to_string(), true),
            "no flaky work for node-1 during its ejection"
        );
    }

    // An operator's restore ends it, and a reconnect does not bring it back.
    std::fs::remove_file(&mark).unwrap();
    client
        .post_json("/v1/nodes/node-1/restore", &serde_json::json!({}))
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            node(&nodes(&client).await, "node-1")["function_breakers"] == serde_json::json!([])
        })
        .await
    );
    cluster.restart_node(0).await.unwrap();
    let ran_on_node_1 = common::eventually(Duration::from_secs(15), || async {
        invoke(&client).await == ("node-1".to_string(), true)
    })
    .await;
    assert!(ran_on_node_1, "node-1 takes flaky work again");
    cluster.shutdown().await;
}
