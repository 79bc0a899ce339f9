//! GPU placement and isolation on a whole in-process cluster (no GPU needed): a node
//! that declares two GPUs gets the functions that need one, each task sees exactly the
//! GPU it was given, and functions without a GPU see none.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_tasks_go_to_gpu_nodes_and_see_only_their_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = common::start_cluster(dir.path(), 1).await;

    // A third node, declaring two GPUs (as an operator would where NVML finds none).
    let cache = dir.path().join("gpu-node");
    let runtime = ferry_runtime::Runtime::new(ferry_runtime::Config {
        cache_dir: cache.clone(),
        ..Default::default()
    })
    .unwrap();
    let mut c = ferry_order_client::Config::detect("gpu-node");
    assert_eq!(c.capacity.gpus, 0, "this machine has no NVIDIA driver");
    c.capacity.gpus = 2;
    c.tags.push("gpu".into());
    c.order_servers = vec![cluster.order_server_url().to_string()];
    c.token = Some(cluster.token.clone());
    c.cache_dir = cache;
    let agent = ferry_order_client::start(c, Some(cluster.store.clone()), runtime);
    assert!(cluster.wait_for_nodes(2, Duration::from_secs(15)).await);

    let script = "#!/bin/sh\nsleep 1\nprintf '%s|%s' \"$CUDA_VISIBLE_DEVICES\" \"$NVIDIA_VISIBLE_DEVICES\"\n";
    client
        .deploy(
            "gpujob",
            common::native_package("gpujob", script, "[resources]\ngpus = 1\n"),
        )
        .await
        .unwrap();
    client
        .deploy("cpujob", common::native_package("cpujob", script, ""))
        .await
        .unwrap();

    // Two at once: both on the GPU node, each with its own GPU.
    let (a, b) = tokio::join!(
        client.invoke("gpujob", b"{}".to_vec()),
        client.invoke("gpujob", b"{}".to_vec())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.node.as_deref(), Some("gpu-node"));
    assert_eq!(b.node.as_deref(), Some("gpu-node"));
    let mut seen = vec![
        String::from_utf8(a.body).unwrap(),
        String::from_utf8(b.body).unwrap(),
    ];
    seen.sort();
    assert_eq!(
        seen,
        vec!["0|0", "1|1"],
        "each task sees exactly its own GPU"
    );

    // A third at once finds no free GPU on the node: nowhere to run it while two hold
    // both GPUs, so it is refused rather than sharing one.
    let (x, y, z) = tokio::join!(
        client.invoke("gpujob", b"{}".to_vec()),
        client.invoke("gpujob", b"{}".to_vec()),
        client.invoke("gpujob", b"{}".to_vec())
    );
    let ok = [&x, &y, &z].iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 2, "two GPUs, two tasks at a time");
    let err = [x, y, z].into_iter().find_map(|r| r.err()).unwrap();
    assert!(
        err.to_string().contains("no attached node has room"),
        "{err}"
    );

    // Without a GPU requirement: every device hidden.
    for _ in 0..3 {
        let out = client.invoke("cpujob", b"{}".to_vec()).await.unwrap();
        assert_eq!(String::from_utf8(out.body).unwrap(), "|void");
    }
    agent.shutdown().await;
    cluster.shutdown().await;
}
