//! End-to-end: the real `ferry` binary, as separate processes, on a real etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Proc, ferry, free_port};
use ferry_sdk::client::Client;

const TOKEN: &str = "e2e-token";

fn component(name: &str, store: &str, args: &[&str]) -> Proc {
    common::component(name, store, TOKEN, args)
}

async fn routable_nodes(client: &Client) -> u64 {
    match client.get_json("/v1/clusters").await {
        Ok(v) => v["clusters"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .flat_map(|c| c["order_servers"].as_array().cloned().unwrap_or_default())
                    .map(|s| s["nodes"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_on_etcd_answer_100_invocations() {
    let etcd = ferry_store::testing::EtcdServer::start().expect("start etcd");
    let store = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let gw_port = free_port();
    let gw_listen = format!("127.0.0.1:{gw_port}");

    let _scheduler = component("cluster-scheduler", &store, &[]);
    let mut os1 = component(
        "order-server",
        &store,
        &["--listen", "127.0.0.1:0", "--id", "os-1"],
    );
    let mut os2 = component(
        "order-server",
        &store,
        &["--listen", "127.0.0.1:0", "--id", "os-2"],
    );
    let _gateway = component(
        "gateway",
        &store,
        &["--listen", &gw_listen, "--data-dir", &d("gateway")],
    );
    let _n1 = component(
        "order-client",
        &store,
        &["--id", "node-a", "--data-dir", &d("node-a")],
    );
    let _n2 = component(
        "order-client",
        &store,
        &["--id", "node-b", "--data-dir", &d("node-b")],
    );

    let client = Client::new(format!("http://{gw_listen}"), Some(TOKEN.into()));
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            routable_nodes(&client).await == 2
        })
        .await,
        "both node agents attach and the routing table shows them"
    );
    let (_, pkg) = common::hello_package();
    let v = client.deploy("hello", pkg).await.expect("deploy");
    assert_eq!(v["version"], 1);

    let mut by_node: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..100 {
        let name = format!("user-{i}");
        let out = client
            .invoke(
                "hello",
                serde_json::to_vec(&serde_json::json!({ "name": name })).unwrap(),
            )
            .await
            .expect("invoke");
        let body: serde_json::Value = serde_json::from_slice(&out.body).expect("JSON output");
        assert_eq!(body["greeting"], format!("Hello, {name}!"), "answer {i}");
        assert_eq!(out.version, Some(1));
        *by_node.entry(out.node.unwrap_or_default()).or_default() += 1;
    }
    println!("invocations by node: {by_node:?}");
    assert_eq!(by_node.values().sum::<u32>(), 100);
    assert!(
        by_node.keys().all(|n| n == "node-a" || n == "node-b"),
        "{by_node:?}"
    );

    // The store knows both nodes as attached (transitions are recorded).
    let nodes = client.get_json("/v1/nodes").await.unwrap();
    let attached = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["recorded"] == "attached" && n["state"] == "ready")
        .count();
    assert_eq!(attached, 2, "{nodes}");

    // kill -9 the order-server that has nodes: they move to the other one, and
    // invocations work again once they have (the gateway skips the dead instance).
    let table = client.get_json("/v1/clusters").await.unwrap();
    let busy = table["clusters"][0]["order_servers"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (victim, survivor) = if busy == "os-1" {
        (&mut os1, "os-2")
    } else {
        (&mut os2, "os-1")
    };
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let moved = common::eventually(Duration::from_secs(30), || async {
        let Ok(t) = client.get_json("/v1/clusters").await else {
            return false;
        };
        let servers = t["clusters"][0]["order_servers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        servers.len() == 1 && servers[0]["id"] == survivor && servers[0]["nodes"] == 2
    })
    .await;
    assert!(moved, "both nodes re-attach to {survivor}");
    for i in 0..10 {
        let out = client
            .invoke("hello", format!(r#"{{"name":"after-{i}"}}"#).into_bytes())
            .await
            .expect("invoke after failover");
        assert!(String::from_utf8_lossy(&out.body).contains(&format!("Hello, after-{i}!")));
    }
}

fn run_cli(args: &[&str], url: &str, token: &str) -> (i32, String, String) {
    let out = ferry()
        .args(args)
        .env("FERRY_URL", url)
        .env("FERRY_TOKEN", token)
        .current_dir(common::root())
        .output()
        .expect("run ferry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spawn_up(data_dir: &str, listen: &str) -> Proc {
    let mut cmd = ferry();
    cmd.args([
        "up",
        "--listen",
        listen,
        "--data-dir",
        data_dir,
        "--token",
        TOKEN,
    ])
    .stdout(Stdio::null());
    Proc::spawn("ferry up", &mut cmd)
}

async fn wait_healthy(url: &str) -> bool {
    let http = reqwest::Client::new();
    common::eventually(Duration::from_secs(30), || {
        let http = http.clone();
        async move {
            http.get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_up_deploy_invoke_from_the_command_line() {
    common::hello_package(); // fails early, clearly, if the wasm is not built
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("http://{listen}");
    let mut up = spawn_up(&data, &listen);
    assert!(wait_healthy(&url).await, "ferry up becomes ready");
    let client = Client::new(url.clone(), Some(TOKEN.into()));
    assert!(
        common::eventually(Duration::from_secs(15), || async {
            routable_nodes(&client).await == 2
        })
        .await
    );

    let (code, out, err) = run_cli(&["deploy", "functions/hello"], &url, TOKEN);
    assert_eq!(code, 0, "deploy: {out} {err}");
    assert!(
        out.starts_with("hello version 1") && out.contains("sha256:"),
        "{out}"
    );

    let (code, out, err) = run_cli(
        &["invoke", "hello", "--data", r#"{"name":"ada"}"#],
        &url,
        TOKEN,
    );
    assert_eq!(code, 0, "invoke: {err}");
    assert_eq!(out.trim(), r#"{"greeting":"Hello, ada!"}"#);

    let input = dir.path().join("input.json");
    std::fs::write(&input, r#"{"name":"file"}"#).unwrap();
    let (code, out, _) = run_cli(
        &[
            "invoke",
            "hello",
            "--data",
            &format!("@{}", input.display()),
        ],
        &url,
        TOKEN,
    );
    assert_eq!(code, 0);
    assert!(out.contains("Hello, file!"), "{out}");

    // Errors: one readable line, a stable exit code.
    let (code, _, err) = run_cli(&["invoke", "nope"], &url, TOKEN);
    assert_eq!(code, 3, "unknown function exits 3: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("function_not_found"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["functions"], &url, "wrong");
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_cli(&["deploy", "functions/does-not-exist"], &url, TOKEN);
    assert_eq!(code, 2, "{err}");

    let (code, out, _) = run_cli(&["functions"], &url, TOKEN);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("hello") && l.contains(" 1 ")),
        "{out}"
    );

    // Restart: SIGTERM, start again on the same data dir, the function is still there.
    let pid = up.pid() as i32;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = up.child.wait();
    let up2 = spawn_up(&data, &listen);
    assert!(wait_healthy(&url).await, "ferry up comes back");
    assert!(
        common::eventually(Duration::from_secs(15), || async {
            routable_nodes(&client).await == 2
        })
        .await
    );
    let (code, out, err) = run_cli(
        &["invoke", "hello", "--data", r#"{"name":"again"}"#],
        &url,
        TOKEN,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Hello, again!"));
    drop(up2);
}

/// A node agent's function environment and cgroup settings are checked at start: a
/// passed variable it does not have, or a cgroup that is not auto/off/an absolute
/// directory, stops it with an error naming the setting (and never a value).
#[test]
fn a_node_agent_refuses_settings_it_cannot_honour() {
    let cases: [(&[&str], &str); 2] = [
        (
            &["--function-env-pass", "FERRY_TEST_NOT_SET"],
            "function_env_pass names FERRY_TEST_NOT_SET",
        ),
        (&["--cgroup", "relative/dir"], "cgroup \"relative/dir\""),
    ];
    for (args, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = ferry();
        cmd.args(["order-client", "--order-server", "http://127.0.0.1:1"])
            .args(["--gateway", "http://127.0.0.1:1", "--data-dir"])
            .arg(dir.path())
            .args(["--function-env", "AWS_REGION=r1"])
            .args(args)
            .env_remove("FERRY_TEST_NOT_SET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut agent = Proc::spawn("order-client", &mut cmd);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = agent.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{args:?}: the agent kept running"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(agent.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// `ferry run` gives a native function the variables a node's function_env would:
/// `--env KEY=VALUE` and `--env-pass NAME` (from its own environment).
#[test]
fn ferry_run_passes_the_function_environment() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("fn");
    std::fs::create_dir_all(&f).unwrap();
    std::fs::write(
        f.join("ferry.toml"),
        "name = \"envtest\"\nkind = \"native\"\nentrypoint = [\"./run.sh\"]\n",
    )
    .unwrap();
    std::fs::write(f.join("run.sh"), "#!/bin/sh\necho \"$GREETING $PASSED\"\n").unwrap();
    std::fs::set_permissions(f.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = ferry()
        .current_dir(dir.path())
        .args([
            "run",
            "fn",
            "--env",
            "GREETING=hello",
            "--env-pass",
            "PASSED",
        ])
        .env("PASSED", "world")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello world");
    let out = ferry()
        .current_dir(dir.path())
        .args(["run", "fn", "--env-pass", "FERRY_TEST_NOT_SET"])
        .env_remove("FERRY_TEST_NOT_SET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FERRY_TEST_NOT_SET"));
}
