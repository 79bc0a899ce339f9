//! The AWS Lambda Invoke API, driven by boto3 (installed by scripts/setup.sh): SigV4
//! with a tenant's key pair, RequestResponse / Event / DryRun, Tail logs, function
//! errors, and Lambda's exceptions for not found, bad JSON, too large and throttled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_invokes_through_the_lambda_api() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, admin) = common::start_cluster(dir.path(), 1).await;
    let mut pairs = vec![];
    for (tenant, limits) in [
        ("aws", json!({"max_body": 1 << 20})),
        ("tight", json!({"qps": 0.001, "burst": 1})),
    ] {
        admin
            .post_json("/v1/tenants", &json!({"id": tenant, "limits": limits}))
            .await
            .unwrap();
        let k = admin
            .post_json(&format!("/v1/tenants/{tenant}/keys"), &json!({}))
            .await
            .unwrap();
        pairs.push((
            k["aws_access_key_id"].as_str().unwrap().to_string(),
            k["aws_secret_access_key"].as_str().unwrap().to_string(),
        ));
    }
    let hello = common::hello_package().1;
    admin.deploy("aws.hello", hello.clone()).await.unwrap();
    admin.deploy("tight.hello", hello).await.unwrap();
    admin
        .deploy(
            "aws.loud",
            common::native_package(
                "loud",
                "#!/bin/sh\necho 'a line for the log tail' >&2\necho '{\"ok\":true}'\n",
                "",
            ),
        )
        .await
        .unwrap();
    admin
        .deploy(
            "aws.fails",
            common::native_package(
                "fails",
                "#!/bin/sh\necho 'boom: bad input' >&2\nexit 3\n",
                "",
            ),
        )
        .await
        .unwrap();

    let script = common::root().join("cli/tests/lambda/boto3_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("ENDPOINT", &cluster.url)
        .env("AKID", &pairs[0].0)
        .env("SECRET", &pairs[0].1)
        .env("TIGHT_AKID", &pairs[1].0)
        .env("TIGHT_SECRET", &pairs[1].1)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .await
        .expect("run python3 (scripts/setup.sh installs boto3)");
    assert!(
        out.status.success(),
        "the boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{r:#}");

    let rr = &r["request_response"];
    assert_eq!(rr["status"], 200);
    assert_eq!(rr["version"], "1", "X-Amz-Executed-Version");
    assert_eq!(rr["payload"]["greeting"], "Hello, ada!");
    assert!(rr["function_error"].is_null());
    assert_eq!(r["qualified"], json!({"status": 200, "version": "1"}));
    assert_eq!(r["event"]["status"], 202);
    assert_eq!(r["dry_run"]["status"], 204);
    assert_eq!(r["tail"]["status"], 200);
    assert_eq!(r["tail"]["payload"]["ok"], true);
    assert!(
        r["tail"]["log"]
            .as_str()
            .unwrap()
            .contains("a line for the log tail"),
        "X-Amz-Log-Result: {}",
        r["tail"]
    );
    let fe = &r["function_error"];
    assert_eq!(
        (fe["status"].as_u64(), fe["function_error"].as_str()),
        (Some(200), Some("Unhandled"))
    );
    assert!(
        fe["payload"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("boom: bad input"),
        "{fe}"
    );
    assert_eq!(fe["version"], "1");
    let refused = |k: &str| {
        (
            r[k]["status"].as_u64().unwrap_or(0),
            r[k]["code"].as_str().unwrap_or("").to_string(),
        )
    };
    assert_eq!(
        refused("not_found"),
        (404, "ResourceNotFoundException".into())
    );
    assert_eq!(
        refused("dry_run_not_found"),
        (404, "ResourceNotFoundException".into())
    );
    assert_eq!(
        refused("bad_json"),
        (400, "InvalidRequestContentException".into())
    );
    assert_eq!(
        refused("too_large"),
        (413, "RequestTooLargeException".into())
    );
    assert_eq!(
        refused("throttled"),
        (429, "TooManyRequestsException".into())
    );
    assert_eq!(r["throttled"]["reason"], "CallerRateLimitExceeded");
    assert!(
        r["throttled"]["retry_after"].is_string(),
        "{}",
        r["throttled"]
    );
    assert_eq!(
        refused("bad_signature"),
        (403, "InvalidSignatureException".into())
    );
    assert_eq!(
        refused("unknown_key"),
        (403, "UnrecognizedClientException".into())
    );

    // The Event invocation is a durable task of the tenant's function.
    let ran = common::eventually(Duration::from_secs(30), || async {
        admin
            .get_json("/v1/tasks?function=aws.hello&state=succeeded")
            .await
            .is_ok_and(|v| v["tasks"].as_array().is_some_and(|t| t.len() == 1))
    })
    .await;
    assert!(ran, "the Event invocation ran as a task");

    // Unsigned requests are refused (the operator has not allowed them).
    let unsigned = reqwest::Client::new()
        .post(format!(
            "{}/2015-03-31/functions/hello/invocations",
            cluster.url
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 403);
    assert_eq!(
        unsigned.headers()["x-amzn-errortype"],
        "UnrecognizedClientException"
    );
    cluster.shutdown().await;
}
