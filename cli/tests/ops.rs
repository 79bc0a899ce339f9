//! Every component serves /healthz, /readyz and /metrics: the real binaries on a real
//! etcd, with `--ops-listen`. The metrics count what happened (a success and a failure
//! on the node, the node ready on the order-server, the cluster in the routing table),
//! and /readyz turns 503 when the store goes away.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Proc, free_port};
use ferry_sdk::client::Client;

const TOKEN: &str = "ops-token";

fn with_ops(name: &str, store: &str, port: u16, extra: &[&str]) -> Proc {
    let ops = format!("127.0.0.1:{port}");
    let mut args = vec!["--ops-listen", ops.as_str()];
    args.extend_from_slice(extra);
    common::component(name, store, TOKEN, &args)
}

async fn get(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The value of the first sample of `metric` whose labels include all of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split(['{', ' ']).next() == Some(metric) && labels.iter().all(|x| l.contains(x))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_reports_health_readiness_and_metrics() {
    let mut etcd = ferry_store::testing::EtcdServer::start().expect("start etcd");
    let store = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let (p_sched, p_os, p_node) = (free_port(), free_port(), free_port());
    let _sched = with_ops("cluster-scheduler", &store, p_sched, &[]);
    let _os = with_ops("order-server", &store, p_os, &["--listen", "127.0.0.1:0"]);
    let node_dir = dir.path().join("node").display().to_string();
    let _node = with_ops(
        "order-client",
        &store,
        p_node,
        &["--id", "node-ops", "--slots", "3", "--data-dir", &node_dir],
    );
    let gw_port = free_port();
    let gw_dir = dir.path().join("gw").display().to_string();
    let _gw = common::component(
        "gateway",
        &store,
        TOKEN,
        &[
            "--listen",
            &format!("127.0.0.1:{gw_port}"),
            "--data-dir",
            &gw_dir,
        ],
    );
    let client = Client::new(format!("http://127.0.0.1:{gw_port}"), Some(TOKEN.into()));
    let ready = common::eventually(Duration::from_secs(30), || async {
        client
            .get_json("/v1/clusters")
            .await
            .is_ok_and(|v| v["clusters"][0]["order_servers"][0]["nodes"].as_u64() == Some(1))
    })
    .await;
    assert!(ready, "the node is routable");
    for port in [p_sched, p_os, p_node] {
        assert_eq!(
            get(port, "/healthz").await,
            (200, "ok\n".into()),
            "port {port}"
        );
        assert_eq!(get(port, "/readyz").await.0, 200, "port {port}");
        assert_eq!(get(port, "/nope").await.0, 404);
    }

    client
        .deploy("ok", common::native_package("ok", "#!/bin/sh\ncat\n", ""))
        .await
        .unwrap();
    client
        .deploy(
            "bad",
            common::native_package("bad", "#!/bin/sh\nexit 3\n", ""),
        )
        .await
        .unwrap();
    client.invoke("ok", b"{}".to_vec()).await.unwrap();
    assert!(client.invoke("bad", b"{}".to_vec()).await.is_err());
    // And one async task: claimed, then committed final.
    let id = client
        .submit("ok", b"{}".to_vec(), &Default::default())
        .await
        .unwrap();
    let t = client.wait(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");

    let (_, node) = get(p_node, "/metrics").await;
    let node_label = r#"node="node-ops""#;
    let outcome = |o: &str| {
        sample(
            &node,
            "ferry_order_client_tasks_total",
            &[node_label, &format!(r#"outcome="{o}""#)],
        )
    };
    assert_eq!(outcome("OUTCOME_SUCCEEDED"), Some(2.0), "{node}");
    assert_eq!(outcome("OUTCOME_FUNCTION_ERROR"), Some(1.0), "{node}");
    assert_eq!(
        sample(&node, "ferry_order_client_connected", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&node, "ferry_order_client_running_tasks", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&node, "ferry_order_client_task_duration_seconds_count", &[]),
        Some(3.0)
    );
    // Deploying prefetches packages, so a run is cold only if it raced the prefetch.
    let cold = sample(&node, "ferry_order_client_cold_starts_total", &[]).unwrap();
    assert!(cold <= 2.0, "{cold}");

    // The commit is counted right after the store has it: wait (bounded) for that.
    let counted = common::eventually(Duration::from_secs(5), || async {
        let (_, os) = get(p_os, "/metrics").await;
        sample(&os, "ferry_order_server_finished_total", &[]) == Some(1.0)
    })
    .await;
    assert!(counted, "the commit is counted");
    let (_, os) = get(p_os, "/metrics").await;
    assert_eq!(
        sample(&os, "ferry_order_server_nodes", &[r#"state="ready""#]),
        Some(1.0),
        "{os}"
    );
    assert_eq!(
        sample(&os, "ferry_order_server_slots", &[r#"kind="total""#]),
        Some(3.0)
    );
    assert_eq!(
        sample(&os, "ferry_order_server_slots", &[r#"kind="used""#]),
        Some(0.0)
    );
    for (counter, n) in [
        ("ferry_order_server_claimed_total", 1.0),
        ("ferry_order_server_finished_total", 1.0),
        ("ferry_order_server_retried_total", 0.0),
    ] {
        assert_eq!(sample(&os, counter, &[]), Some(n), "{counter}: {os}");
    }
    let (_, sched) = get(p_sched, "/metrics").await;
    assert_eq!(
        sample(
            &sched,
            "ferry_cluster_scheduler_nodes",
            &[r#"cluster="local""#]
        ),
        Some(1.0),
        "{sched}"
    );
    assert!(sample(&sched, "ferry_cluster_scheduler_publishes_total", &[]).unwrap() >= 1.0);

    // Without the store, the components are alive but not ready.
    etcd.stop();
    let not_ready = common::eventually(Duration::from_secs(15), || async {
        get(p_os, "/readyz").await.0 == 503 && get(p_sched, "/readyz").await.0 == 503
    })
    .await;
    assert!(not_ready, "/readyz is 503 without the store");
    assert_eq!(get(p_os, "/healthz").await.0, 200);
}
