//! Admission limits: each limit answers 429 (with Retry-After and the limit's name) when
//! exceeded, touches no other tenant or function, and admits again once it recovers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ferry_sdk::client::{Client, ClientError, SubmitOptions};
use serde_json::json;

/// Invokes `name` with raw HTTP: (status, Retry-After, X-Ferry-Limit, error code).
async fn call(
    url: &str,
    key: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Option<u64>, String, String) {
    let r = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let h = |k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry = h("retry-after").and_then(|v| v.parse().ok());
    let limit = h("x-ferry-limit").unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or_default();
    (
        status,
        retry,
        limit,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qps_limits_trip_and_recover_per_tenant_and_function() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, admin) = common::start_cluster(dir.path(), 1).await;
    let url = cluster.url.clone();
    let mk = |id: &'static str, limits: serde_json::Value| {
        let admin = admin.clone();
        let url = url.clone();
        async move {
            admin
                .post_json("/v1/tenants", &json!({ "id": id, "limits": limits }))
                .await
                .unwrap();
            let k = admin
                .post_json(&format!("/v1/tenants/{id}/keys"), &json!({}))
                .await
                .unwrap();
            let key = k["key"].as_str().unwrap().to_string();
            (Client::new(&url, Some(key.clone())), key)
        }
    };
    let (slow, slow_key) = mk("slow", json!({"qps": 1.0, "burst": 3})).await;
    let (free, free_key) = mk("free", json!({})).await;
    let hello = common::hello_package().1;
    slow.deploy("hello", hello.clone()).await.unwrap();
    free.deploy("hello", hello).await.unwrap();

    // The burst is admitted, the next call is refused with when to come back.
    let invoke = "/v1/functions/hello/invoke";
    for i in 0..3 {
        let r = call(&url, &slow_key, invoke, b"{}".to_vec()).await;
        assert_eq!(r.0, 200, "call {i} within the burst: {r:?}");
    }
    let refused = call(&url, &slow_key, invoke, b"{}".to_vec()).await;
    assert_eq!(refused.0, 429, "{refused:?}");
    assert_eq!(refused.2, "tenant_qps");
    assert_eq!(refused.3, "rate_limited");
    let retry = refused.1.expect("Retry-After");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Async submissions count against the same bucket.
    let r = slow
        .submit("hello", b"{}".to_vec(), &SubmitOptions::default())
        .await;
    assert!(
        matches!(r, Err(ClientError::Api { status: 429, .. })),
        "{r:?}"
    );
    // Another tenant's flood of calls is its own business.
    for _ in 0..10 {
        assert_eq!(call(&url, &free_key, invoke, b"{}".to_vec()).await.0, 200);
    }
    // After Retry-After the tenant is admitted again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        call(&url, &slow_key, invoke, b"{}".to_vec()).await.0,
        200,
        "recovered"
    );

    // Per function: one function's limit leaves the tenant's others alone.
    let (fq, fq_key) = mk("fq", json!({"function_qps": 1.0})).await;
    fq.deploy("hello", common::hello_package().1).await.unwrap();
    fq.deploy(
        "echo",
        common::native_package("echo", "#!/bin/sh\ncat\n", ""),
    )
    .await
    .unwrap();
    assert_eq!(call(&url, &fq_key, invoke, b"{}".to_vec()).await.0, 200);
    let r = call(&url, &fq_key, invoke, b"{}".to_vec()).await;
    assert_eq!((r.0, r.2.as_str()), (429, "function_qps"), "{r:?}");
    let echo = "/v1/functions/echo/invoke";
    assert_eq!(call(&url, &fq_key, echo, b"{}".to_vec()).await.0, 200);
    tokio::time::sleep(Duration::from_secs(r.1.unwrap())).await;
    assert_eq!(
        call(&url, &fq_key, invoke, b"{}".to_vec()).await.0,
        200,
        "recovered"
    );

    // Limits change at once: lifting the tenant's limit admits the next call.
    admin
        .put_json("/v1/tenants/slow/limits", &json!({}))
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(call(&url, &slow_key, invoke, b"{}".to_vec()).await.0, 200);
    }

    // Body size per tenant.
    let (_, small_key) = mk("small", json!({"max_body": 64})).await;
    admin
        .deploy("small.hello", common::hello_package().1)
        .await
        .unwrap();
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(100)).into_bytes();
    assert_eq!(call(&url, &small_key, invoke, big).await.0, 413);
    assert_eq!(call(&url, &small_key, invoke, b"{}".to_vec()).await.0, 200);

    // Rejections are counted by reason.
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"ferry_gateway_rejections_total{reason="tenant_qps"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"ferry_gateway_rejections_total{reason="function_qps"} 1"#));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_trips_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, admin) = common::start_cluster(dir.path(), 1).await;
    let url = cluster.url.clone();
    admin
        .post_json(
            "/v1/tenants",
            &json!({ "id": "one", "limits": {"function_concurrency": 1} }),
        )
        .await
        .unwrap();
    let k = admin
        .post_json("/v1/tenants/one/keys", &json!({}))
        .await
        .unwrap();
    let key = k["key"].as_str().unwrap().to_string();
    // A function that says it started, then waits until the test releases it.
    let gate = tempfile::tempdir().unwrap();
    let g = gate.path().display();
    let script = format!(
        "#!/bin/sh\ntouch {g}/started\ni=0\nwhile [ ! -f {g}/release ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\necho '{{}}'\n"
    );
    let pkg = common::native_package("gated", &script, "[limits]\ntimeout_ms = 60000\n");
    admin.deploy("one.gated", pkg).await.unwrap();

    let path = "/v1/functions/gated/invoke";
    let first = tokio::spawn({
        let (url, key) = (url.clone(), key.clone());
        async move { call(&url, &key, path, b"{}".to_vec()).await }
    });
    let started = common::eventually(Duration::from_secs(30), || async {
        gate.path().join("started").exists()
    })
    .await;
    assert!(started, "the first invocation runs");
    let r = call(&url, &key, path, b"{}".to_vec()).await;
    assert_eq!((r.0, r.2.as_str()), (429, "function_concurrency"), "{r:?}");
    assert!(r.1.is_some(), "Retry-After");
    std::fs::write(gate.path().join("release"), b"").unwrap();
    assert_eq!(first.await.unwrap().0, 200);
    // The slot is free again (the function now returns at once).
    assert_eq!(
        call(&url, &key, path, b"{}".to_vec()).await.0,
        200,
        "recovered"
    );
    cluster.shutdown().await;
}
