//! Queues: a tenant's queue holds its submissions to the queue's QPS and gives them its
//! class; tenants see and use only their own queues; only the admin token sets them;
//! bad settings change nothing; `ferry queues` and `/metrics` show depth and limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use ferry_sdk::client::{Client, ClientError, SubmitOptions};
use serde_json::json;

fn in_queue(q: &str) -> SubmitOptions {
    SubmitOptions {
        queue: Some(q.into()),
        ..SubmitOptions::default()
    }
}

fn status(r: &Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(ClientError::Api { status, .. }) => *status,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_queue_holds_its_own_flood_and_nobody_elses() {
    let dir = tempfile::tempdir().unwrap();
    // No node agents: tasks stay queued, so depths are exact.
    let (cluster, admin) = common::start_cluster(dir.path(), 0).await;
    let url = cluster.url.clone();
    let mut clients = vec![];
    for id in ["acme", "zeta"] {
        admin
            .post_json("/v1/tenants", &json!({ "id": id }))
            .await
            .unwrap();
        let k = admin
            .post_json(&format!("/v1/tenants/{id}/keys"), &json!({}))
            .await
            .unwrap();
        let c = Client::new(&url, Some(k["key"].as_str().unwrap().to_string()));
        c.deploy("hello", common::hello_package().1).await.unwrap();
        clients.push(c);
    }
    let (acme, zeta) = (&clients[0], &clients[1]);

    // Only the admin token sets queues; bad settings are 400s that change nothing.
    let r = acme
        .put_json("/v1/queues/uploads", &json!({ "mrt": 100 }))
        .await;
    assert_eq!(status(&r), 403, "{r:?}");
    let q = admin
        .put_json(
            "/v1/queues/acme.uploads",
            &json!({ "qps": 1.0, "burst": 3, "mrt": 2, "priority": "batch" }),
        )
        .await
        .unwrap();
    assert_eq!(
        (q["mrt"].as_u64(), q["priority"].as_str()),
        (Some(2), Some("batch"))
    );
    for bad in [
        json!({ "qps": 0 }),
        json!({ "burst": 2 }),
        json!({ "priority": "urgent" }),
        json!({ "mrt": -1 }),
        json!({ "limit": 3 }),
    ] {
        let r = admin.put_json("/v1/queues/acme.uploads", &bad).await;
        assert_eq!(status(&r), 400, "{bad}: {r:?}");
    }
    let r = admin
        .put_json("/v1/queues/nobody.uploads", &json!({}))
        .await;
    assert_eq!(status(&r), 404, "a queue of a tenant that does not exist");
    let seen = acme.get_json("/v1/queues/uploads").await.unwrap();
    assert_eq!(
        (
            seen["qps"].as_f64(),
            seen["mrt"].as_u64(),
            seen["configured"].as_bool()
        ),
        (Some(1.0), Some(2), Some(true)),
        "unchanged by the refused settings: {seen}"
    );
    assert!(
        seen.get("tenant").is_none(),
        "tenants are not told tenant ids"
    );

    // The burst is admitted, then acme's flood is refused at its queue ...
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(
            acme.submit("hello", b"{}".to_vec(), &in_queue("uploads"))
                .await
                .unwrap(),
        );
    }
    let refused = acme
        .submit("hello", b"{}".to_vec(), &in_queue("uploads"))
        .await;
    match &refused {
        Err(ClientError::Api { status, code, .. }) => {
            assert_eq!((*status, code.as_str()), (429, "rate_limited"))
        }
        other => panic!("expected a 429: {other:?}"),
    }
    // ... while acme's other queue and zeta are untouched by it.
    for _ in 0..5 {
        acme.submit("hello", b"{}".to_vec(), &SubmitOptions::default())
            .await
            .unwrap();
        zeta.submit("hello", b"{}".to_vec(), &SubmitOptions::default())
            .await
            .unwrap();
    }
    // The queue's class is the tasks' class, and the task says where it waits.
    let t = acme
        .get_json(&format!("/v1/tasks/{}", ids[0]))
        .await
        .unwrap();
    assert_eq!(
        (t["queue"].as_str(), t["priority"].as_str()),
        (Some("uploads"), Some("batch")),
        "{t}"
    );
    // Asking for a class still wins over the queue's.
    let critical = SubmitOptions {
        priority: Some("critical".into()),
        ..SubmitOptions::default()
    };
    let id = zeta
        .submit("hello", b"{}".to_vec(), &critical)
        .await
        .unwrap();
    let t = zeta.get_json(&format!("/v1/tasks/{id}")).await.unwrap();
    assert_eq!(
        (t["queue"].as_str(), t["priority"].as_str()),
        (Some("default"), Some("critical"))
    );

    // Tenants see only their own queues: another tenant's is a 404, like a missing one.
    for r in [
        zeta.submit("hello", b"{}".to_vec(), &in_queue("uploads"))
            .await,
        acme.submit("hello", b"{}".to_vec(), &in_queue("nope"))
            .await,
    ] {
        assert_eq!(status(&r), 404, "{r:?}");
    }
    assert_eq!(status(&zeta.get_json("/v1/queues/uploads").await), 404);
    let names = |v: serde_json::Value| -> Vec<String> {
        v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(zeta.get_json("/v1/queues").await.unwrap()),
        ["default", "reruns"]
    );
    let acme_queues = acme.get_json("/v1/queues").await.unwrap();
    assert_eq!(names(acme_queues.clone()), ["default", "reruns", "uploads"]);
    let depth = |v: &serde_json::Value, name: &str| {
        v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name)
            .map(|q| q["queued"].as_u64().unwrap())
    };
    assert_eq!(depth(&acme_queues, "uploads"), Some(3));
    assert_eq!(depth(&acme_queues, "default"), Some(5));

    // The CLI shows the same, and the admin sees every tenant's queue by its full name.
    let out = common::ferry()
        .args(["queues", "--url", &url, "--token", "test-token"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("acme.uploads "))
        .unwrap_or_else(|| panic!("acme.uploads listed: {text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols,
        ["acme.uploads", "batch", "1.0", "2", "3", "0"],
        "{text}"
    );
    let out = common::ferry()
        .args(["queue", "set", "zeta.nightly", "--mrt", "0", "--qps=-3"])
        .args(["--url", &url, "--token", "test-token"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "bad input exits 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("qps -3"), "one readable line: {err}");
    assert_eq!(
        names(zeta.get_json("/v1/queues").await.unwrap()),
        ["default", "reruns"],
        "the refused queue was not created"
    );

    // Depths and refusals by queue in /metrics.
    let m = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains(
            r#"ferry_gateway_queue_tasks{priority="batch",queue="acme.uploads",state="queued"} 3"#
        ),
        "{m}"
    );
    assert!(m.contains(r#"ferry_gateway_rejections_total{reason="queue_qps"} 1"#));

    // Deleting the queue: acme can no longer name it; its tasks stay.
    admin.delete("/v1/queues/acme.uploads").await.unwrap();
    let r = acme
        .submit("hello", b"{}".to_vec(), &in_queue("uploads"))
        .await;
    assert_eq!(status(&r), 404);
    assert_eq!(status(&admin.delete("/v1/queues/acme.uploads").await), 404);
    let t = acme
        .get_json(&format!("/v1/tasks/{}", ids[0]))
        .await
        .unwrap();
    assert_eq!(t["state"], "queued");
    cluster.shutdown().await;
}
