//! Batch re-runs select exactly the matching tasks (function, version, state, time) and
//! resubmit their inputs on the batch priority, with progress to follow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_sdk::client::{Client, SubmitOptions};
use serde_json::json;

const SCRIPT: &str = "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *fail*) echo bad >&2; exit 1;; esac\necho \"$input\"\n";

async fn submit_all(c: &Client, name: &str, inputs: &[&str]) -> Vec<String> {
    let mut ids = vec![];
    for i in inputs {
        ids.push(
            c.submit(name, i.as_bytes().to_vec(), &SubmitOptions::default())
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        let t = c.wait(id, Duration::from_secs(30)).await.unwrap();
        assert!(
            matches!(t["state"].as_str(), Some("succeeded" | "failed")),
            "{t}"
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_selects_exactly_the_matching_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, c) = common::start_cluster(dir.path(), 1).await;
    let once = "[retry]\nmax_attempts = 1\n";
    c.deploy("parity", common::native_package("parity", SCRIPT, once))
        .await
        .unwrap();
    c.deploy("other", common::native_package("other", SCRIPT, once))
        .await
        .unwrap();
    let v1 = submit_all(
        &c,
        "parity",
        &[
            r#"{"n":1,"fail":1}"#,
            r#"{"n":2}"#,
            r#"{"n":3,"fail":1}"#,
            r#"{"n":4}"#,
            r#"{"n":5,"fail":1}"#,
        ],
    )
    .await;
    let before_v2 = ferry_core::now_ms();
    // Version 2 (new bytes) and another function: failures that must not be selected.
    c.deploy(
        "parity",
        common::native_package("parity", &format!("{SCRIPT}# v2\n"), once),
    )
    .await
    .unwrap();
    submit_all(&c, "parity", &[r#"{"n":6,"fail":1}"#]).await;
    submit_all(&c, "other", &[r#"{"n":7,"fail":1}"#]).await;
    let failed_v1: BTreeSet<String> = [&v1[0], &v1[2], &v1[4]].into_iter().cloned().collect();

    let r = c
        .post_json(
            "/v1/reruns",
            &json!({"function": "parity", "version": 1, "state": "failed"}),
        )
        .await
        .unwrap();
    assert_eq!(r["selected"], 3, "{r}");
    let originals: BTreeSet<String> = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["original"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        originals, failed_v1,
        "exactly the failed tasks of version 1"
    );
    for t in r["tasks"].as_array().unwrap() {
        let new = c.task(t["task_id"].as_str().unwrap()).await.unwrap();
        let old = c.task(t["original"].as_str().unwrap()).await.unwrap();
        assert_eq!(new["priority"], "batch", "{new}");
        assert_eq!(new["version"], 1);
        assert_ne!(new["id"], old["id"]);
    }
    // Progress: every new task ends (they fail again: same input, same version).
    let id = r["id"].as_str().unwrap().to_string();
    let done = common::eventually(Duration::from_secs(30), || async {
        c.get_json(&format!("/v1/reruns/{id}"))
            .await
            .is_ok_and(|s| s["done"] == true)
    })
    .await;
    assert!(done, "the re-run finishes");
    let s = c.get_json(&format!("/v1/reruns/{id}")).await.unwrap();
    assert_eq!(
        (s["selected"].as_u64(), s["finished"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(s["states"]["failed"], 3, "{s}");

    // Time range: the state filter alone now sees v2's failure too (and the re-run's own
    // new failures); before version 2 existed, only v1's.
    let r = c
        .post_json(
            "/v1/reruns",
            &json!({"function": "parity", "state": "failed", "until_ms": before_v2}),
        )
        .await
        .unwrap();
    assert_eq!(r["selected"], 3, "{r}");
    let r = c
        .post_json(
            "/v1/reruns",
            &json!({"function": "parity", "state": "succeeded", "version": 2}),
        )
        .await
        .unwrap();
    assert_eq!(r["selected"], 0, "{r}");
    // The CLI.
    let out = common::ferry()
        .args([
            "rerun",
            "start",
            "parity",
            "--state",
            "succeeded",
            "--version",
            "1",
        ])
        .args(["--url", &cluster.url, "--token", "test-token"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        c.get_json(&format!("/v1/reruns/{rid}")).await.unwrap()["selected"],
        2
    );
    // Unknown functions are refused.
    assert!(
        c.post_json("/v1/reruns", &json!({"function": "nope"}))
            .await
            .is_err()
    );
    cluster.shutdown().await;
}
