//! `/openapi.json` stays true: every route the gateway's router serves is documented
//! with exactly the methods it answers, and every documented route is served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// `/v1/functions/{name}` → `/v1/functions/x`.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "x" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_route_is_documented_and_the_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, _) = common::start_cluster(dir.path(), 0).await;
    let http = reqwest::Client::new();
    let doc: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("{}/openapi.json", cluster.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (path.clone(), m.clone()))
                .collect::<Vec<_>>()
        })
        .collect();

    // What the router serves: for each registered path, the methods that do not answer
    // 405 (no token is sent, so nothing runs: 401 on the native routes).
    let mut served = BTreeSet::new();
    for path in ferry_gateway::served_paths() {
        for m in METHODS {
            let method = reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let r = http
                .request(method, format!("{}{}", cluster.url, concrete(path)))
                .send()
                .await
                .unwrap();
            assert_ne!(r.status(), 404, "{m} {path}: registered but unreachable");
            if r.status() != 405 {
                served.insert((path.to_string(), m.to_string()));
            }
        }
    }
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in /openapi.json: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in /openapi.json but not served: {unserved:?}"
    );
    assert!(served.len() > 25, "{served:?}");
    // Every operation says what it answers.
    for (path, m) in &documented {
        assert!(
            doc["paths"][path][m]["responses"].is_object()
                && doc["paths"][path][m]["summary"].is_string(),
            "{m} {path}"
        );
    }
    cluster.shutdown().await;
}
