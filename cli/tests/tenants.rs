//! Tenants and API keys: two tenants on one cluster never see each other's functions or
//! tasks (404 exactly as for what does not exist), keys are stored only as hashes, and
//! revoked keys stop working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ferry_sdk::client::{Client, ClientError, SubmitOptions};
use serde_json::json;

/// The (status, code, message) of a failed call, with `name` replaced by `NAME`.
fn refusal(r: Result<serde_json::Value, ClientError>, name: &str) -> (u16, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => (status, code, message.replace(name, "NAME")),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn status(r: Result<serde_json::Value, ClientError>) -> u16 {
    match r {
        Err(ClientError::Api { status, .. }) => status,
        Ok(v) => panic!("expected a refusal, got {v}"),
        Err(e) => panic!("expected an API refusal, got {e}"),
    }
}

async fn tenant_with_key(admin: &Client, url: &str, id: &str) -> (Client, String) {
    admin
        .post_json("/v1/tenants", &json!({ "id": id }))
        .await
        .unwrap();
    let k = admin
        .post_json(&format!("/v1/tenants/{id}/keys"), &json!({}))
        .await
        .unwrap();
    let key = k["key"].as_str().unwrap().to_string();
    (Client::new(url, Some(key.clone())), key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_on_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, admin) = common::start_cluster(dir.path(), 1).await;
    let (acme, acme_key) = tenant_with_key(&admin, &cluster.url, "acme").await;
    let (bravo, bravo_key) = tenant_with_key(&admin, &cluster.url, "bravo").await;

    // Both tenants own a function called `hello`: the names are scoped per tenant.
    let hello = common::hello_package().1;
    let a = acme.deploy("hello", hello.clone()).await.unwrap();
    let b = bravo.deploy("hello", hello).await.unwrap();
    assert_eq!(a["name"], "hello", "a tenant sees its own names: {a}");
    assert_eq!(
        (a["version"].as_u64(), b["version"].as_u64()),
        (Some(1), Some(1))
    );
    let out = acme
        .invoke("hello", br#"{"name":"a"}"#.to_vec())
        .await
        .unwrap();
    assert_eq!(out.version, Some(1));
    let out = bravo
        .invoke("hello", br#"{"name":"b"}"#.to_vec())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.body).contains("Hello, b!"));

    // acme alone owns `secret`, with a version and a task.
    let pkg = common::native_package("secret", "#!/bin/sh\ncat\n", "");
    acme.deploy("secret", pkg).await.unwrap();
    acme.put_json("/v1/functions/secret/aliases/prod", &json!({"version": 1}))
        .await
        .unwrap();
    let task = acme
        .submit("secret", b"{}".to_vec(), &SubmitOptions::default())
        .await
        .unwrap();
    let done = acme.wait(&task, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["function"], "secret", "{done}");

    // To bravo, acme's function is exactly as absent as one that never existed.
    for (what, path) in [
        ("function", "/v1/functions/NAME"),
        ("versions", "/v1/functions/NAME/versions"),
        ("version", "/v1/functions/NAME/versions/1"),
        ("version by number", "/v1/functions/NAME:1/versions"),
        ("aliases", "/v1/functions/NAME/aliases"),
        ("alias", "/v1/functions/NAME/aliases/prod"),
    ] {
        let theirs = refusal(
            bravo.get_json(&path.replace("NAME", "secret")).await,
            "secret",
        );
        let nothing = refusal(
            bravo.get_json(&path.replace("NAME", "never-was")).await,
            "never-was",
        );
        assert_eq!(theirs.0, 404, "{what}: {theirs:?}");
        assert_eq!(theirs, nothing, "{what} must not tell the two apart");
    }
    for path in [
        "/v1/functions/NAME/invoke",
        "/v1/functions/NAME/tasks",
        "/v1/functions/NAME:1/invoke",
        "/v1/functions/NAME:prod/invoke",
    ] {
        let theirs = refusal(
            bravo
                .post_json(&path.replace("NAME", "secret"), &json!({}))
                .await,
            "secret",
        );
        let nothing = refusal(
            bravo
                .post_json(&path.replace("NAME", "never-was"), &json!({}))
                .await,
            "never-was",
        );
        assert_eq!(theirs.0, 404, "{path}: {theirs:?}");
        assert_eq!(theirs, nothing, "{path} must not tell the two apart");
    }
    let theirs = refusal(
        bravo
            .put_json("/v1/functions/secret/aliases/x", &json!({"version": 1}))
            .await,
        "secret",
    );
    let nothing = refusal(
        bravo
            .put_json("/v1/functions/never-was/aliases/x", &json!({"version": 1}))
            .await,
        "never-was",
    );
    assert_eq!((theirs.0, &theirs), (404, &nothing), "setting an alias");
    // … and so is acme's task.
    let missing = "0000000000000000000000000a";
    let theirs = refusal(bravo.task(&task).await, &task);
    let nothing = refusal(bravo.task(missing).await, missing);
    assert_eq!(theirs.0, 404);
    assert_eq!(theirs, nothing);
    let theirs = refusal(bravo.cancel(&task).await, &task);
    let nothing = refusal(bravo.cancel(missing).await, missing);
    assert_eq!(theirs, nothing);
    // Lists hold only the caller's own, under the names it knows.
    let list = bravo.get_json("/v1/functions").await.unwrap();
    let names: Vec<_> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("hello")], "{list}");
    for q in ["", "?function=secret", "?state=succeeded"] {
        let t = bravo.get_json(&format!("/v1/tasks{q}")).await.unwrap();
        assert!(t["tasks"].as_array().unwrap().is_empty(), "bravo lists {t}");
    }
    let t = acme.get_json("/v1/tasks?function=secret").await.unwrap();
    assert_eq!(t["tasks"].as_array().unwrap().len(), 1, "{t}");
    assert_eq!(t["tasks"][0]["function"], "secret");
    // A tenant cannot reach around its scope with a qualified name either.
    let r = bravo.get_json("/v1/functions/acme.secret").await;
    assert_eq!(status(r), 404);

    // The admin sees everything, qualified.
    let all = admin.get_json("/v1/functions").await.unwrap();
    let mut names: Vec<_> = all["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["acme.hello", "acme.secret", "bravo.hello"]);
    assert_eq!(admin.task(&task).await.unwrap()["function"], "acme.secret");

    // Operator routes refuse tenant keys.
    let sha = a["sha256"].as_str().unwrap();
    for path in [
        "/v1/tenants".to_string(),
        "/v1/tenants/bravo/keys".to_string(),
        "/v1/nodes".to_string(),
        "/v1/clusters".to_string(),
        format!("/v1/packages/{sha}"),
    ] {
        assert_eq!(status(bravo.get_json(&path).await), 403, "{path}");
    }
    assert_eq!(
        status(bravo.post_json("/v1/tenants", &json!({"id": "evil"})).await),
        403
    );

    // Keys are stored only as hashes: no key's bytes are anywhere in the store.
    let everything = cluster.store.range(ferry_core::keys::ROOT).await.unwrap();
    for kv in &everything.kvs {
        for key in [&acme_key, &bravo_key] {
            let raw = String::from_utf8_lossy(&kv.value);
            assert!(!raw.contains(key.as_str()) && !kv.key.contains(key.as_str()));
        }
    }
    let listed = admin.get_json("/v1/tenants/bravo/keys").await.unwrap();
    assert!(!listed.to_string().contains(&bravo_key), "{listed}");

    // A revoked key stops working; a made-up one never did.
    let key_id = listed["keys"][0]["id"].as_str().unwrap();
    admin
        .delete(&format!("/v1/tenants/bravo/keys/{key_id}"))
        .await
        .unwrap();
    assert_eq!(status(bravo.get_json("/v1/functions").await), 401);
    // The real key with its last character changed (never to itself).
    let last = if acme_key.ends_with('0') { '1' } else { '0' };
    let forged = Client::new(
        &cluster.url,
        Some(format!("{}{last}", &acme_key[..acme_key.len() - 1])),
    );
    assert_eq!(status(forged.get_json("/v1/functions").await), 401);
    assert!(acme.get_json("/v1/functions").await.is_ok());
    // Deleting a tenant revokes its keys.
    admin.delete("/v1/tenants/acme").await.unwrap();
    assert_eq!(status(acme.get_json("/v1/functions").await), 401);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_tenants_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, _admin) = common::start_cluster(dir.path(), 0).await;
    let run = |args: &[&str]| {
        let out = common::ferry()
            .args(args)
            .args(["--url", &cluster.url, "--token", "test-token"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&[
        "tenants",
        "create",
        "media",
        "--qps",
        "50",
        "--function-concurrency",
        "4",
    ]);
    let list = run(&["tenants", "list"]);
    assert!(list.contains("media") && list.contains("qps=50"), "{list}");
    let key = run(&["keys", "create", "media", "--description", "ci"])
        .trim()
        .to_string();
    assert!(key.starts_with("fk_") && key.len() > 60, "{key}");
    let tenant = Client::new(&cluster.url, Some(key.clone()));
    assert!(tenant.get_json("/v1/functions").await.is_ok());
    let keys = run(&["keys", "list", "media"]);
    assert!(keys.contains("ci") && !keys.contains(&key), "{keys}");
    let id = keys
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    run(&["keys", "revoke", "media", &id]);
    assert_eq!(status(tenant.get_json("/v1/functions").await), 401);
    cluster.shutdown().await;
}
