//! Immutable versions and aliases: invoke by name (latest), version or alias; a 90/10
//! alias splits 1,000 invocations within ±3 points; every answer names the version.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ferry_sdk::client::{Client, ClientError, SubmitOptions};
use serde_json::json;

/// A native function that prints which version it is.
fn version_package(n: u32) -> Vec<u8> {
    common::native_package("canary", &format!("#!/bin/sh\necho '{{\"v\":{n}}}'\n"), "")
}

async fn invoke_version(c: &Client, name: &str) -> u32 {
    let out = c.invoke(name, b"{}".to_vec()).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
    let header = out.version.expect("X-Ferry-Version on every answer");
    assert_eq!(body["v"], header, "the header names the version that ran");
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_route_by_weight_and_every_answer_names_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = common::start_cluster(dir.path(), 2).await;
    for n in 1..=3 {
        let v = client.deploy("canary", version_package(n)).await.unwrap();
        assert_eq!(v["version"], n);
    }
    // Versions are immutable: the same bytes again publish nothing new.
    let again = client.deploy("canary", version_package(3)).await.unwrap();
    assert_eq!(
        (again["version"].as_u64(), again["unchanged"].as_bool()),
        (Some(3), Some(true))
    );

    assert_eq!(invoke_version(&client, "canary").await, 3, "latest");
    assert_eq!(invoke_version(&client, "canary:1").await, 1);
    assert_eq!(invoke_version(&client, "canary:latest").await, 3);

    // One version.
    client
        .put_json("/v1/functions/canary/aliases/prod", &json!({"version": 1}))
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(invoke_version(&client, "canary:prod").await, 1);
    }
    // A task submitted through the alias runs (and says) the alias's version.
    let r = client
        .post_json("/v1/functions/canary:prod/tasks", &json!({}))
        .await
        .unwrap();
    assert_eq!(r["version"], 1, "{r}");
    let t = client
        .wait(
            r["task_id"].as_str().unwrap(),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(
        (t["version"].as_u64(), t["output"]["v"].as_u64()),
        (Some(1), Some(1)),
        "{t}"
    );

    // 90/10 between 2 and 3, set through the CLI.
    let out = common::ferry()
        .args(["alias", "set", "canary", "prod", "2=90", "3=10"])
        .args(["--url", &cluster.url, "--token", "test-token"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut counts = [0u32; 4];
    for _ in 0..1000 {
        counts[invoke_version(&client, "canary:prod").await as usize] += 1;
    }
    assert_eq!(
        counts[0] + counts[1],
        0,
        "only the alias's versions ran: {counts:?}"
    );
    let canary_share = f64::from(counts[3]) / 10.0;
    assert!(
        (7.0..=13.0).contains(&canary_share),
        "version 3 ran {canary_share}% of 1,000 invocations (aim 10 ± 3): {counts:?}"
    );
    let listed = client
        .get_json("/v1/functions/canary/aliases")
        .await
        .unwrap();
    assert_eq!(
        listed["aliases"][0]["routes"],
        json!([{"version": 2, "weight": 90}, {"version": 3, "weight": 10}])
    );

    // Refusals: a version that does not exist, a bad split, an unknown alias.
    let missing = client
        .put_json("/v1/functions/canary/aliases/prod", &json!({"version": 9}))
        .await;
    assert!(
        matches!(missing, Err(ClientError::Api { status: 404, ref code, .. }) if code == "version_not_found"),
        "{missing:?}"
    );
    let zero = client
        .put_json(
            "/v1/functions/canary/aliases/prod",
            &json!({"routes": [{"version": 1, "weight": 0}]}),
        )
        .await;
    assert!(
        matches!(zero, Err(ClientError::Api { status: 400, .. })),
        "{zero:?}"
    );
    let nope = client.invoke("canary:nope", b"{}".to_vec()).await;
    assert!(
        matches!(nope, Err(ClientError::Api { status: 404, ref code, .. }) if code == "version_not_found"),
        "{nope:?}"
    );
    // The refused updates changed nothing.
    assert_eq!(
        client
            .get_json("/v1/functions/canary/aliases/prod")
            .await
            .unwrap()["routes"],
        listed["aliases"][0]["routes"]
    );
    client
        .delete("/v1/functions/canary/aliases/prod")
        .await
        .unwrap();
    assert!(client.invoke("canary:prod", b"{}".to_vec()).await.is_err());

    // Async submissions through an alias name their version too.
    client
        .put_json(
            "/v1/functions/canary/aliases/stable",
            &json!({"version": 2}),
        )
        .await
        .unwrap();
    let id = client
        .submit("canary:stable", b"{}".to_vec(), &SubmitOptions::default())
        .await
        .unwrap();
    assert_eq!(client.task(&id).await.unwrap()["version"], 2);
    cluster.shutdown().await;
}
