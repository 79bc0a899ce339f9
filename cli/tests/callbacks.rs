//! Task callbacks and retention on a whole in-process cluster: the final result is
//! POSTed to the task's callback URL, signed (a tenant's with its own secret), retried with
//! backoff when the receiver fails; finished tasks disappear after the retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use ferry_sdk::client::SubmitOptions;
use hmac::{Hmac, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// One received request: (headers lower-cased, body).
type Received = (Vec<(String, String)>, Vec<u8>);

/// A tiny HTTP receiver: answers 500 to the first `fail_first` requests, then 200.
async fn receiver(fail_first: usize) -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read headers, then Content-Length bytes of body.
            let (headers, body) = loop {
                let k = sock.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break (vec![], vec![]);
                }
                buf.extend_from_slice(&chunk[..k]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let headers: Vec<(String, String)> = head
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let k = sock.read(&mut chunk).await.unwrap_or(0);
                    if k == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                }
                break (headers, buf[end + 4..].to_vec());
            };
            n += 1;
            let status = if n <= fail_first {
                "500 Oops"
            } else {
                "200 OK"
            };
            let _ = sock
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
            let _ = tx.send((headers, body));
        }
    });
    (url, rx)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_signed_retried_and_recorded_and_old_tasks_expire() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = ferry_cli::up::Tuning {
        callback_secret: Some("hook-secret".into()),
        task_retention: Duration::from_secs(8),
        ..Default::default()
    };
    let (cluster, client) = common::start_cluster_tuned(dir.path(), 1, tuning).await;
    client
        .deploy("hello", common::hello_package().1)
        .await
        .unwrap();
    let (url, mut got) = receiver(1).await;
    let opts = SubmitOptions {
        callback_url: Some(url),
        ..SubmitOptions::default()
    };
    let id = client
        .submit("hello", br#"{"name":"cb"}"#.to_vec(), &opts)
        .await
        .unwrap();

    // First delivery is refused (500), the retry a second later is accepted.
    let mut deliveries = vec![];
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(15), got.recv())
            .await
            .expect("a callback arrives")
            .unwrap();
        deliveries.push(d);
    }
    for (headers, body) in &deliveries {
        assert_eq!(header(headers, "x-ferry-task-id"), id);
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["task_id"], id.as_str());
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["output"]["greeting"], "Hello, cb!");
        // X-Ferry-Signature: t=<ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
        let sig = header(headers, "x-ferry-signature");
        let (t, v1) = sig
            .strip_prefix("t=")
            .and_then(|s| s.split_once(",v1="))
            .unwrap_or_else(|| panic!("signature header {sig:?}"));
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        assert_eq!(
            v1,
            hex::encode(mac.finalize().into_bytes()),
            "signature verifies"
        );
    }
    // The delivery is recorded on the task once it is over.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            let t = client.task(&id).await.unwrap();
            t["callback"]["delivered"] == true && t["callback"]["attempts"] == 2
        })
        .await,
        "{}",
        client.task(&id).await.unwrap()
    );
    assert!(
        cluster
            .store
            .range(ferry_core::keys::CALLBACKS)
            .await
            .unwrap()
            .kvs
            .is_empty(),
        "nothing left to deliver"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        got.try_recv().is_err(),
        "no delivery after the accepted one"
    );

    // Retention: 8 s after it finished (plus a sweep), the task and its index are gone.
    let gone = common::eventually(Duration::from_secs(20), || async {
        client.task(&id).await.is_err()
    })
    .await;
    assert!(gone, "the finished task is removed after its retention");
    let err = client.task(&id).await.unwrap_err().to_string();
    assert!(
        err.contains("not_found") || err.contains("no task"),
        "{err}"
    );
    for prefix in [ferry_core::keys::DONE, ferry_core::keys::TASK_INDEX] {
        assert!(
            cluster.store.range(prefix).await.unwrap().kvs.is_empty(),
            "{prefix} is empty after the retention"
        );
    }
    cluster.shutdown().await;
}

/// Whether `headers`' signature is the HMAC of its time and `body` under `secret`.
fn signed_with(headers: &[(String, String)], body: &[u8], secret: &str) -> bool {
    let sig = header(headers, "x-ferry-signature");
    let Some((t, v1)) = sig.strip_prefix("t=").and_then(|s| s.split_once(",v1=")) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    v1 == hex::encode(mac.finalize().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_callbacks_are_signed_with_its_own_secret() {
    let dir = tempfile::tempdir().unwrap();
    let tuning = ferry_cli::up::Tuning {
        callback_secret: Some("operator-secret".into()),
        ..Default::default()
    };
    let (cluster, admin) = common::start_cluster_tuned(dir.path(), 1, tuning).await;
    let mut secrets = vec![];
    for tenant in ["acme", "bravo"] {
        admin
            .post_json("/v1/tenants", &serde_json::json!({ "id": tenant }))
            .await
            .unwrap();
        let key = admin
            .post_json(
                &format!("/v1/tenants/{tenant}/keys"),
                &serde_json::json!({}),
            )
            .await
            .unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string();
        let client = ferry_sdk::client::Client::new(&cluster.url, Some(key));
        let v = client.get_json("/v1/callback-secret").await.unwrap();
        assert_eq!(v["tenant"], tenant);
        secrets.push((client, v["secret"].as_str().unwrap().to_string()));
    }
    let (acme, acme_secret) = &secrets[0];
    let bravo_secret = &secrets[1].1;
    assert_ne!(acme_secret, bravo_secret);
    assert_ne!(acme_secret, "operator-secret");
    let v = admin.get_json("/v1/callback-secret").await.unwrap();
    assert_eq!(
        v["secret"], "operator-secret",
        "the admin's is the operator's"
    );

    acme.deploy("hello", common::hello_package().1)
        .await
        .unwrap();
    let (url, mut got) = receiver(0).await;
    let opts = SubmitOptions {
        callback_url: Some(url),
        ..SubmitOptions::default()
    };
    acme.submit("hello", br#"{"name":"t"}"#.to_vec(), &opts)
        .await
        .unwrap();
    let (headers, body) = tokio::time::timeout(Duration::from_secs(15), got.recv())
        .await
        .expect("a callback arrives")
        .unwrap();
    assert!(
        signed_with(&headers, &body, acme_secret),
        "acme's secret signs it"
    );
    assert!(!signed_with(&headers, &body, bravo_secret), "not bravo's");
    assert!(
        !signed_with(&headers, &body, "operator-secret"),
        "not the operator's"
    );
    cluster.shutdown().await;

    // Without a callback secret there is none to hand out: a 404 that says why.
    let dir = tempfile::tempdir().unwrap();
    let (cluster, admin) = common::start_cluster(dir.path(), 0).await;
    let e = admin.get_json("/v1/callback-secret").await.unwrap_err();
    assert!(e.to_string().contains("unsigned"), "{e}");
    cluster.shutdown().await;
}
