//! OpenFaaS's paths with plain HTTP: `/function/{name}` (sync, any method) and
//! `/async-function/{name}` (202 + X-Call-Id; the result is POSTed to X-Callback-Url with
//! X-Function-Status and X-Call-Id), per tenant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One received callback: lowercase headers and the body.
type Received = (HashMap<String, String>, Vec<u8>);

/// A minimal HTTP/1.1 receiver on loopback: answers 200 to each request and hands it on.
async fn receiver() -> (String, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/done", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, headers) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_string();
                        let headers: HashMap<String, String> = head
                            .lines()
                            .skip(1)
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                            .collect();
                        break (i + 4, headers);
                    }
                };
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[head_end..(head_end + len).min(buf.len())].to_vec();
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tx.send((headers, body));
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openfaas_sync_and_async_with_a_callback() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, admin) = common::start_cluster(dir.path(), 1).await;
    admin
        .post_json("/v1/tenants", &json!({"id": "faas"}))
        .await
        .unwrap();
    let k = admin
        .post_json("/v1/tenants/faas/keys", &json!({}))
        .await
        .unwrap();
    let key = k["key"].as_str().unwrap().to_string();
    admin
        .deploy("faas.hello", common::hello_package().1)
        .await
        .unwrap();
    admin
        .deploy(
            "faas.fails",
            common::native_package("fails", "#!/bin/sh\necho 'no luck' >&2\nexit 1\n", ""),
        )
        .await
        .unwrap();
    // Prints what OpenFaaS's classic watchdog would hand it: the request as Http_ vars.
    let echo_env = "#!/bin/sh\nprintf '%s|%s|%s|%s|%s|%s' \"$Http_Method\" \"$Http_Path\" \"$Http_Query\" \"$Http_X_Trace_Id\" \"$Http_Content_Type\" \"${Http_Authorization:-none}\"\n";
    admin
        .deploy("faas.env", common::native_package("env", echo_env, ""))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = &cluster.url;

    // The method, sub-path, query and headers reach the function; the key does not.
    let r = http
        .patch(format!("{url}/function/env/videos/42?lang=en&x=1"))
        .bearer_auth(&key)
        .header("x-trace-id", "abc-123")
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        String::from_utf8_lossy(&r.bytes().await.unwrap()),
        "PATCH|/videos/42|lang=en&x=1|abc-123|text/plain|none"
    );
    let r = http
        .get(format!("{url}/function/env"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.bytes().await.unwrap()),
        "GET|/||||none",
        "no sub-path is /, no query is empty"
    );

    // Sync: the body in, the output out, with a call id.
    let r = http
        .post(format!("{url}/function/hello"))
        .bearer_auth(&key)
        .body(r#"{"name":"faas"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-call-id"));
    assert_eq!(r.headers()["x-ferry-version"], "1");
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["greeting"], "Hello, faas!");
    // Any method; a sub-path; Basic auth with the key as the password.
    let r = http
        .put(format!("{url}/function/hello/some/path?x=1"))
        .basic_auth("anyone", Some(&key))
        .body(r#"{"name":"put"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(String::from_utf8_lossy(&r.bytes().await.unwrap()).contains("Hello, put!"));
    // A failing function is a 500 with its error; unknown names 404; no key 401.
    let r = http
        .post(format!("{url}/function/fails"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(String::from_utf8_lossy(&r.bytes().await.unwrap()).contains("no luck"));
    let r = http
        .post(format!("{url}/function/nope"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("{url}/function/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Async with a callback, for a success and a failure.
    let (callback, mut received) = receiver().await;
    let mut ids = HashMap::new();
    for (name, input) in [("hello", r#"{"name":"later"}"#), ("fails", "{}")] {
        let r = http
            .post(format!("{url}/async-function/{name}"))
            .bearer_auth(&key)
            .header("x-callback-url", &callback)
            .body(input)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{name}");
        let id = r.headers()["x-call-id"].to_str().unwrap().to_string();
        assert!(!id.is_empty());
        ids.insert(id, name);
    }
    let mut got = HashMap::new();
    for _ in 0..2 {
        let (headers, body) = tokio::time::timeout(Duration::from_secs(30), received.recv())
            .await
            .expect("a callback arrives")
            .expect("receiver alive");
        let id = headers["x-call-id"].clone();
        let name = ids
            .get(id.as_str())
            .copied()
            .expect("a call id we were given");
        got.insert(name, (headers["x-function-status"].clone(), body));
    }
    assert_eq!(got["hello"].0, "200");
    let out: serde_json::Value = serde_json::from_slice(&got["hello"].1).unwrap();
    assert_eq!(out["greeting"], "Hello, later!");
    assert_eq!(got["fails"].0, "500");
    assert!(String::from_utf8_lossy(&got["fails"].1).contains("no luck"));
    // Delivered once: nothing pending is left.
    let pending = common::eventually(Duration::from_secs(10), || async {
        cluster
            .store
            .range(ferry_core::keys::CALLBACKS)
            .await
            .unwrap()
            .kvs
            .is_empty()
    })
    .await;
    assert!(pending, "delivered callbacks are removed");
    assert!(
        tokio::time::timeout(Duration::from_millis(600), received.recv())
            .await
            .is_err(),
        "no second delivery"
    );
    cluster.shutdown().await;
}
