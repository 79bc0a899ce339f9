//! Async tasks through the whole platform in one process: durable submission, exactly
//! one committed result, retries, cancellation, idempotency, fail-over of a lost node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use ferry_cli::up::Cluster;
use ferry_sdk::client::{Client, ClientError, SubmitOptions};

async fn start(dir: &Path, nodes: u32) -> (Cluster, Client) {
    common::start_cluster(dir, nodes).await
}

fn opts() -> SubmitOptions {
    SubmitOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_completes_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path(), 2).await;
    client
        .deploy("hello", common::hello_package().1)
        .await
        .unwrap();
    let mut ids = vec![];
    for i in 0..200 {
        let id = client
            .submit(
                "hello",
                format!(r#"{{"name":"t{i}"}}"#).into_bytes(),
                &opts(),
            )
            .await
            .unwrap();
        ids.push((i, id));
    }
    for (i, id) in &ids {
        let t = client.wait(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["output"]["greeting"], format!("Hello, t{i}!"));
        assert_eq!(t["attempt"], 1, "one attempt, one committed result: {t}");
        assert_eq!(t["attempts"].as_array().unwrap().len(), 1);
    }
    let done = client
        .get_json("/v1/tasks?function=hello&state=succeeded&limit=1000")
        .await
        .unwrap();
    assert_eq!(done["tasks"].as_array().unwrap().len(), 200);
    // Nothing is left in the queue, claimed (running) or not.
    assert!(
        cluster
            .store
            .range(ferry_core::keys::QUEUE)
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_function_is_retried_with_backoff_then_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path(), 2).await;
    let pkg = common::native_package(
        "fails",
        "#!/bin/sh\necho 'boom: disk on fire' >&2\nexit 7\n",
        "[retry]\nmax_attempts = 3\nbackoff_ms = 100\n",
    );
    client.deploy("fails", pkg).await.unwrap();
    let id = client
        .submit("fails", b"{}".to_vec(), &opts())
        .await
        .unwrap();
    let t = client.wait(&id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["attempt"], 3);
    let attempts = t["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts.iter().all(|a| a["outcome"] == "function_error"),
        "{t}"
    );
    assert!(
        t["error"].as_str().unwrap().contains("boom: disk on fire"),
        "the reason is kept: {t}"
    );
    // Backoff: the retries did not start back to back.
    let gap =
        attempts[1]["started_ms"].as_u64().unwrap() - attempts[0]["finished_ms"].as_u64().unwrap();
    assert!(gap >= 50, "waited {gap} ms before retrying");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_tasks_can_be_cancelled_and_keys_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    // No node: tasks stay queued.
    let (cluster, client) = start(dir.path(), 0).await;
    client
        .deploy("hello", common::hello_package().1)
        .await
        .unwrap();
    let id = client
        .submit("hello", b"{}".to_vec(), &opts())
        .await
        .unwrap();
    assert_eq!(client.task(&id).await.unwrap()["state"], "queued");
    let t = client.cancel(&id).await.unwrap();
    assert_eq!(t["state"], "cancelled");
    match client.cancel(&id).await {
        Err(ClientError::Api { status: 409, .. }) => {}
        other => panic!("cancelling twice is a conflict, got {other:?}"),
    }
    assert!(
        cluster
            .store
            .range(ferry_core::keys::QUEUE)
            .await
            .unwrap()
            .kvs
            .is_empty(),
        "the queue entry went with it"
    );

    let keyed = SubmitOptions {
        idempotency_key: Some("order-42".into()),
        ..opts()
    };
    let a = client
        .submit("hello", br#"{"name":"x"}"#.to_vec(), &keyed)
        .await
        .unwrap();
    let b = client
        .submit("hello", br#"{"name":"x"}"#.to_vec(), &keyed)
        .await
        .unwrap();
    assert_eq!(a, b, "same key, same body: the same task");
    match client
        .submit("hello", br#"{"name":"y"}"#.to_vec(), &keyed)
        .await
    {
        Err(ClientError::Api {
            status: 409, code, ..
        }) => assert_eq!(code, "conflict"),
        other => panic!("same key, other body: 409, got {other:?}"),
    }
    let queued = client.get_json("/v1/tasks?state=queued").await.unwrap();
    assert_eq!(
        queued["tasks"].as_array().unwrap().len(),
        1,
        "one task for the key"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_a_lost_node_run_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, client) = start(dir.path(), 2).await;
    let pkg = common::native_package("slow", "#!/bin/sh\nsleep 1\necho '{\"ok\":true}'\n", "");
    client.deploy("slow", pkg).await.unwrap();
    let mut ids = vec![];
    for _ in 0..6 {
        ids.push(
            client
                .submit("slow", b"{}".to_vec(), &opts())
                .await
                .unwrap(),
        );
    }
    // Once node-1 runs something, take it away.
    let node1_busy = common::eventually(Duration::from_secs(10), || async {
        let v = client.get_json("/v1/tasks?state=running").await.unwrap();
        v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["attempts"].as_array().unwrap().last().unwrap()["node"] == "node-1")
    })
    .await;
    assert!(node1_busy);
    cluster.stop_node(0).await;
    let mut failed_over = 0;
    for id in &ids {
        let t = client.wait(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(t["state"], "succeeded", "{t}");
        let attempts = t["attempts"].as_array().unwrap();
        if attempts.len() > 1 {
            failed_over += 1;
            assert_eq!(attempts[0]["node"], "node-1");
            assert_eq!(attempts[0]["outcome"], "failed", "{t}");
            assert_eq!(attempts.last().unwrap()["node"], "node-2");
        }
    }
    assert!(
        failed_over >= 1,
        "at least the task node-1 was running moved to node-2"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_stopped_on_its_node_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path(), 1).await;
    let marker = dir.path().join("finished");
    let script = format!(
        "#!/bin/sh\nsleep 5\ntouch {}\necho '{{}}'\n",
        marker.display()
    );
    client
        .deploy("long", common::native_package("long", &script, ""))
        .await
        .unwrap();
    let id = client
        .submit("long", b"{}".to_vec(), &opts())
        .await
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            client.task(&id).await.unwrap()["state"] == "running"
        })
        .await
    );
    // The claim is a mark on the queue entry (the record is written when the attempt
    // ends); readers lay it over the record: the task, its attempt and listings say
    // running.
    let running = client.task(&id).await.unwrap();
    assert_eq!(running["attempt"], 1, "{running}");
    assert_eq!(running["attempts"][0]["node"], "node-1", "{running}");
    let listed = client
        .get_json("/v1/tasks?function=long&state=running")
        .await
        .unwrap();
    assert_eq!(listed["tasks"][0]["id"], id.as_str(), "{listed}");
    let kv = cluster
        .store
        .get(&ferry_core::keys::task(&id))
        .await
        .unwrap()
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(stored["state"], "queued", "not rewritten by the claim");
    let t = client.cancel(&id).await.unwrap();
    assert_eq!(t["cancel_requested"], true, "{t}");
    let seen = client.task(&id).await.unwrap();
    assert!(
        seen["state"] == "cancelled" || seen["cancel_requested"] == true,
        "the request shows: {seen}"
    );
    let t = client.wait(&id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(t["state"], "cancelled", "{t}");
    assert_eq!(t["attempts"][0]["outcome"], "cancelled");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !marker.exists(),
        "the function was killed, not left to finish"
    );
    cluster.shutdown().await;
}

/// A native function's `ferry-progress:` lines show in its task while it runs, and the
/// progress key is gone once the task is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_shows_in_the_task_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path(), 1).await;
    let script = "#!/bin/sh\nfor p in 10 35 60 85; do echo \"ferry-progress: $p fps=$p\" >&2; sleep 0.7; done\nprintf done\n";
    client
        .deploy("steps", common::native_package("steps", script, ""))
        .await
        .unwrap();
    let id = client
        .submit("steps", b"{}".to_vec(), &opts())
        .await
        .unwrap();
    let mut seen = vec![];
    for _ in 0..100 {
        let t = client.task(&id).await.unwrap();
        if let Some(p) = t["progress"].as_object() {
            assert_eq!(t["state"], "running", "{t}");
            assert_eq!(p["attempt"], 1);
            let pct = p["percent"].as_f64().unwrap();
            assert_eq!(p["message"], format!("fps={pct}"), "{t}");
            if seen.last() != Some(&pct) {
                seen.push(pct);
            }
        }
        if t["state"] == "succeeded" {
            assert!(t.get("progress").is_none(), "{t}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.len() >= 2,
        "several reports seen while it ran: {seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        cluster
            .store
            .get(&ferry_core::keys::progress(&id))
            .await
            .unwrap()
            .is_none(),
        "no progress key outlives its task"
    );
    cluster.shutdown().await;
}

/// The page of `/v1/tasks{query}` as (ids, next).
async fn page(client: &Client, query: &str) -> (Vec<String>, Option<String>) {
    let v = client.get_json(&format!("/v1/tasks{query}")).await.unwrap();
    let ids = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    (ids, v["next"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_pages_of_an_index_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    // No nodes: every task stays queued.
    let (cluster, admin) = start(dir.path(), 0).await;
    let hello = common::hello_package().1;
    admin.deploy("hello", hello.clone()).await.unwrap();
    admin
        .post_json("/v1/tenants", &serde_json::json!({ "id": "acme" }))
        .await
        .unwrap();
    let key = admin
        .post_json("/v1/tenants/acme/keys", &serde_json::json!({}))
        .await
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let acme = Client::new(&cluster.url, Some(key));
    // Its own `hello`: another function than the operator's of that name.
    acme.deploy("hello", hello).await.unwrap();
    // 25 of the operator's tasks, one of acme's every fifth; one millisecond apart at
    // least, so creation times order them.
    let (mut ours, mut theirs) = (vec![], vec![]);
    for i in 0..25 {
        ours.push(
            admin
                .submit("hello", b"{}".to_vec(), &opts())
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        if i % 5 == 0 {
            theirs.push(acme.submit("hello", b"{}".to_vec(), &opts()).await.unwrap());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let newest_first = |ids: &[String]| ids.iter().rev().cloned().collect::<Vec<_>>();

    // A function's tasks in pages of 10, each continuing where the last stopped.
    let (p1, next) = page(&admin, "?function=hello&limit=10").await;
    let (p2, next) = page(
        &admin,
        &format!("?function=hello&limit=10&after={}", next.unwrap()),
    )
    .await;
    let (p3, next) = page(
        &admin,
        &format!("?function=hello&limit=10&after={}", next.unwrap()),
    )
    .await;
    assert_eq!(next, None, "the last page says there is no more");
    assert_eq!([p1, p2, p3].concat(), newest_first(&ours));

    // A tenant lists its own tasks only; the admin lists every owner's, merged by time.
    assert_eq!(page(&acme, "").await.0, newest_first(&theirs));
    assert_eq!(
        page(&acme, "?function=hello").await.0,
        newest_first(&theirs)
    );
    assert_eq!(
        page(&admin, "?function=acme.hello").await.0,
        newest_first(&theirs)
    );
    let (all, next) = page(&admin, "?limit=1000").await;
    assert_eq!(next, None);
    assert_eq!(all.len(), ours.len() + theirs.len());
    let mut created = vec![];
    for id in &all {
        created.push(
            admin.task(id).await.unwrap()["created_ms"]
                .as_u64()
                .unwrap(),
        );
    }
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");
    // The merge pages too.
    let (first, next) = page(&admin, "?limit=7").await;
    let (second, _) = page(&admin, &format!("?limit=100&after={}", next.unwrap())).await;
    assert_eq!([first, second].concat(), all);

    // A time window: created in [since, until).
    let at = |id: &String| {
        let admin = admin.clone();
        let id = id.clone();
        async move {
            admin.task(&id).await.unwrap()["created_ms"]
                .as_u64()
                .unwrap()
        }
    };
    let (since, until) = (at(&ours[5]).await, at(&ours[15]).await);
    let (window, _) = page(
        &admin,
        &format!("?function=hello&since_ms={since}&until_ms={until}"),
    )
    .await;
    assert_eq!(window, newest_first(&ours[5..15]));
    // A state filter skips what does not match.
    assert_eq!(page(&admin, "?state=succeeded").await, (vec![], None));
    assert_eq!(
        page(&admin, "?function=hello&state=queued&limit=3").await.0,
        newest_first(&ours)[..3]
    );

    // Bad queries are 400s.
    for bad in [
        "?after=nonsense".to_string(),
        "?after=123/abc".to_string(),
        format!("?since_ms={until}&until_ms={since}"),
        "?state=sleeping".to_string(),
        "?color=red".to_string(),
    ] {
        match admin.get_json(&format!("/v1/tasks{bad}")).await {
            Err(ClientError::Api { status, .. }) => assert_eq!(status, 400, "{bad}"),
            other => panic!("{bad}: expected a 400, got {other:?}"),
        }
    }

    // A task written before the index existed is indexed when a gateway starts.
    let old = cluster
        .store
        .get(&ferry_core::keys::task(&ours[0]))
        .await
        .unwrap()
        .unwrap();
    let mut record: ferry_core::task::TaskRecord = serde_json::from_slice(&old.value).unwrap();
    record.id = ferry_core::id::new_id();
    record.created_ms = 1;
    cluster
        .store
        .put(
            &ferry_core::keys::task(&record.id),
            serde_json::to_vec(&record).unwrap(),
            0,
        )
        .await
        .unwrap();
    cluster
        .store
        .delete(ferry_core::keys::TASK_INDEX_READY)
        .await
        .unwrap();
    // (What every gateway runs as it starts.)
    let n = ferry_gateway::index_older_tasks(&cluster.store)
        .await
        .unwrap();
    assert_eq!(
        n,
        ours.len() + theirs.len() + 1,
        "every task is indexed once more"
    );
    assert_eq!(
        ferry_gateway::index_older_tasks(&cluster.store)
            .await
            .unwrap(),
        0,
        "once"
    );
    let (listed, _) = page(&admin, "?function=hello&limit=1000").await;
    assert_eq!(
        listed.last(),
        Some(&record.id),
        "the older task is listed, as the oldest"
    );
    assert_eq!(listed.len(), ours.len() + 1);
    cluster.shutdown().await;
}
