//! The whole path in one process (the `ferry up` cluster): deploy, invoke, bad input,
//! restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use ferry_cli::up::Cluster;
use ferry_core::package::{PackFile, build};
use ferry_sdk::client::{Client, ClientError};

async fn start(dir: &Path) -> (Cluster, Client) {
    common::start_cluster(dir, 2).await
}

fn api_error(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => {
            assert!(!message.is_empty(), "every error has a message");
            (status, code)
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Files under `dir`, recursively (to prove refused uploads leave nothing behind).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Each lifetime of the cluster runs on its own runtime: dropping the runtime ends every
/// task it spawned, as a process exit would, so the second start reopens the same store.
#[test]
fn deploy_invoke_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (cluster, client) = start(dir.path()).await;
        let (_, pkg) = common::hello_package();
        let sha = ferry_core::id::sha256_hex(&pkg);

        let v = client.deploy("hello", pkg.clone()).await.unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["sha256"], sha.as_str());
        let again = client.deploy("hello", pkg).await.unwrap();
        assert_eq!(
            again["version"], 1,
            "identical bytes publish no new version"
        );
        assert_eq!(again["unchanged"], true);

        let out = client
            .invoke("hello", br#"{"name":"ada"}"#.to_vec())
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(body["greeting"], "Hello, ada!");
        assert_eq!(out.version, Some(1));
        assert!(out.node.as_deref().is_some_and(|n| n.starts_with("node-")));

        // The function's own error is a function_error, not a platform failure.
        let (status, code) = api_error(
            client
                .invoke_as("hello", b"not json".to_vec(), "text/plain")
                .await,
        );
        assert_eq!((status, code.as_str()), (502, "function_error"));

        let list = client.get_json("/v1/functions").await.unwrap();
        assert_eq!(list["functions"][0]["name"], "hello");
        cluster.shutdown().await;
    });

    // Same data dir: functions and versions are still there and still run.
    runtime().block_on(async {
        let (cluster, client) = start(dir.path()).await;
        let list = client.get_json("/v1/functions").await.unwrap();
        assert_eq!(list["functions"][0]["latest_version"], 1);
        let out = client
            .invoke("hello:1", br#"{"name":"bob"}"#.to_vec())
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&out.body).contains("Hello, bob!"));
        cluster.shutdown().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inputs_and_outputs_cross_every_hop() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let pkg = common::native_package("echo", "#!/bin/sh\nexec cat\n", "");
    client.deploy("echo", pkg).await.unwrap();
    // 5 MiB: over gRPC's 4 MiB default, under the gateway's 6 MiB body limit.
    let input: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 251) as u8).collect();
    let out = client
        .invoke_as("echo", input.clone(), "application/octet-stream")
        .await
        .unwrap();
    assert_eq!(out.body.len(), input.len());
    assert!(out.body == input, "the bytes come back unchanged");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_server_refuses_calls_without_the_cluster_credential() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, _client) = start(dir.path()).await;
    let mut os = ferry_core::proto::order_client::OrderClient::connect(
        cluster.order_server_url().to_string(),
    )
    .await
    .unwrap();
    let spec = ferry_core::proto::FunctionSpec {
        name: "hello".into(),
        timeout_ms: 1000,
        ..Default::default()
    };
    let req = ferry_core::proto::InvokeRequest {
        request_id: "x".into(),
        function: Some(spec),
        input: vec![],
        env: vec![],
    };
    let status = os.invoke(req.clone()).await.unwrap_err();
    assert_eq!(
        ferry_core::Error::from_status(&status).code,
        ferry_core::ErrorCode::Unauthorized
    );
    let mut wrong = tonic::Request::new(req);
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    let status = os.invoke(wrong).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    // A node cannot attach without it either.
    let attach = os
        .attach(tokio_stream::iter(
            Vec::<ferry_core::proto::NodeMessage>::new(),
        ))
        .await;
    assert_eq!(attach.unwrap_err().code(), tonic::Code::Unauthenticated);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_package_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let (m, pkg) =
        ferry_core::package::pack_dir(&common::root().join("functions/checksum")).unwrap();
    client.deploy(&m.name, pkg).await.unwrap();
    let out = client
        .invoke_as(&m.name, b"abc".to_vec(), "application/octet-stream")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(v["bytes"], 3);
    assert_eq!(v["sha256"], ferry_core::id::sha256_hex(b"abc"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_stable_4xx_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = start(dir.path()).await;
    let (_, hello) = common::hello_package();
    client.deploy("hello", hello).await.unwrap();
    let before_functions = client.get_json("/v1/functions").await.unwrap();
    let before_versions = client
        .get_json("/v1/functions/hello/versions")
        .await
        .unwrap();
    let before_files = files_under(&dir.path().join("blobs"));

    let manifest = |name: &str| {
        format!("name = \"{name}\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\n").into_bytes()
    };
    let file = |p: &str, b: &[u8]| PackFile {
        path: p.into(),
        bytes: b.to_vec(),
        executable: false,
    };

    // Invalid WebAssembly: garbage, and a core module where a component is required.
    let garbage = build(vec![
        file("ferry.toml", &manifest("hello")),
        file("m.wasm", b"definitely not wasm"),
    ])
    .unwrap();
    assert_eq!(
        api_error(client.deploy("hello", garbage).await),
        (400, "invalid_wasm".into())
    );
    let core = build(vec![
        file("ferry.toml", &manifest("hello")),
        file("m.wasm", b"\0asm\x01\0\0\0"),
    ])
    .unwrap();
    assert_eq!(
        api_error(client.deploy("hello", core).await),
        (400, "invalid_wasm".into())
    );

    // A tarball with `../` in a path (built by hand: our builder refuses to make one).
    let mut evil = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut evil, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        let mut h = tar::Header::new_old();
        let name = b"../../escape.sh";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(3);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        t.append(&h, &b"hi\n"[..]).unwrap();
        t.into_inner().unwrap().finish().unwrap();
    }
    assert_eq!(
        api_error(client.deploy("hello", evil).await),
        (400, "unsafe_archive".into())
    );
    assert!(
        !dir.path().join("escape.sh").exists()
            && !dir.path().parent().unwrap().join("escape.sh").exists()
    );

    // No ferry.toml; not a tarball at all; a manifest naming another function.
    let no_manifest = build(vec![file("m.wasm", b"\0asm")]).unwrap();
    assert_eq!(
        api_error(client.deploy("hello", no_manifest).await),
        (400, "missing_manifest".into())
    );
    assert_eq!(
        api_error(client.deploy("hello", b"plain bytes".to_vec()).await),
        (400, "invalid_package".into())
    );
    let (_, other) = common::hello_package();
    assert_eq!(
        api_error(client.deploy("other-name", other).await),
        (400, "invalid_manifest".into())
    );

    // Unknown function, unknown version, bad name.
    assert_eq!(
        api_error(client.invoke("nope", b"{}".to_vec()).await),
        (404, "function_not_found".into())
    );
    assert_eq!(
        api_error(client.invoke("hello:9", b"{}".to_vec()).await),
        (404, "version_not_found".into())
    );
    assert_eq!(
        api_error(client.deploy("Bad_Name", b"x".to_vec()).await),
        (400, "invalid_name".into())
    );

    // A body over the limit (6 MiB by default), and malformed JSON.
    let big = vec![b' '; (6 << 20) + 1];
    assert_eq!(
        api_error(
            client
                .invoke_as("hello", big, "application/octet-stream")
                .await
        ),
        (413, "payload_too_large".into())
    );
    assert_eq!(
        api_error(client.invoke("hello", b"{\"name\": ".to_vec()).await),
        (400, "invalid_json".into())
    );
    assert_eq!(
        api_error(
            client
                .post_json("/v1/functions", &serde_json::json!({"nom": 1}))
                .await
        )
        .1,
        "bad_request"
    );

    // Auth: no token, wrong token.
    let anon = Client::new(cluster.url.clone(), None);
    assert_eq!(
        api_error(anon.get_json("/v1/functions").await),
        (401, "unauthorized".into())
    );
    let wrong = Client::new(cluster.url.clone(), Some("test-tokeN".into()));
    assert_eq!(
        api_error(wrong.invoke("hello", b"{}".to_vec()).await),
        (401, "unauthorized".into())
    );

    // Nothing changed.
    assert_eq!(
        client.get_json("/v1/functions").await.unwrap(),
        before_functions
    );
    assert_eq!(
        client
            .get_json("/v1/functions/hello/versions")
            .await
            .unwrap(),
        before_versions
    );
    assert_eq!(
        files_under(&dir.path().join("blobs")),
        before_files,
        "no package bytes were stored"
    );
    cluster.shutdown().await;
}
