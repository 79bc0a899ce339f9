//! Helpers shared by the CLI's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The hello package, built from functions/hello (its wasm must be built first).
pub fn hello_package() -> (ferry_core::package::Manifest, Vec<u8>) {
    let wasm = root().join("target/wasm32-wasip2/release/hello.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: run `cargo build --release -p hello --target wasm32-wasip2` first (the test script does)",
        wasm.display()
    );
    ferry_core::package::pack_dir(&root().join("functions/hello")).expect("pack functions/hello")
}

/// A native package of one shell script: `ferry.toml` (with `extra` TOML appended) and
/// an executable `run.sh`.
pub fn native_package(name: &str, script: &str, extra: &str) -> Vec<u8> {
    use ferry_core::package::{PackFile, build};
    let manifest =
        format!("name = \"{name}\"\nkind = \"native\"\nentrypoint = [\"./run.sh\"]\n{extra}");
    build(vec![
        PackFile {
            path: "ferry.toml".into(),
            bytes: manifest.into_bytes(),
            executable: false,
        },
        PackFile {
            path: "run.sh".into(),
            bytes: script.as_bytes().to_vec(),
            executable: true,
        },
    ])
    .expect("build a native package")
}

/// One `ferry` component as a process on `store`, with the cluster `token`.
pub fn component(name: &str, store: &str, token: &str, args: &[&str]) -> Proc {
    let mut cmd = ferry();
    cmd.arg(name)
        .args(args)
        .env("FERRY_STORE", store)
        .env("FERRY_TOKEN", token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Proc::spawn(name, &mut cmd)
}

/// The in-process `ferry up` cluster on `data_dir` with `nodes` node agents and the
/// token `test-token`, once its nodes are routable; and a client for it.
pub async fn start_cluster(
    data_dir: &std::path::Path,
    nodes: u32,
) -> (ferry_cli::up::Cluster, ferry_sdk::client::Client) {
    start_cluster_tuned(data_dir, nodes, Default::default()).await
}

/// [`start_cluster`] with the order-server's failure detection and breakers tuned.
pub async fn start_cluster_tuned(
    data_dir: &std::path::Path,
    nodes: u32,
    tuning: ferry_cli::up::Tuning,
) -> (ferry_cli::up::Cluster, ferry_sdk::client::Client) {
    start_cluster_with_env(data_dir, nodes, tuning, vec![]).await
}

/// [`start_cluster_tuned`] with variables every native function gets from its node.
pub async fn start_cluster_with_env(
    data_dir: &std::path::Path,
    nodes: u32,
    tuning: ferry_cli::up::Tuning,
    function_env: Vec<(String, String)>,
) -> (ferry_cli::up::Cluster, ferry_sdk::client::Client) {
    let cluster = ferry_cli::up::Cluster::start(ferry_cli::up::UpConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data_dir.to_path_buf(),
        token: "test-token".into(),
        nodes,
        tuning,
        function_env,
        cgroup: Default::default(),
    })
    .await
    .expect("start the cluster");
    assert!(
        cluster.wait_for_nodes(nodes, Duration::from_secs(15)).await,
        "{nodes} node(s) attach"
    );
    let client = ferry_sdk::client::Client::new(cluster.url.clone(), Some("test-token".into()));
    // The routing table lists the cluster (even with no nodes) before tasks can be queued.
    let listed = eventually(Duration::from_secs(10), || async {
        client
            .get_json("/v1/clusters")
            .await
            .is_ok_and(|v| v["clusters"].as_array().is_some_and(|c| !c.is_empty()))
    })
    .await;
    assert!(listed, "the cluster is routable");
    (cluster, client)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.into(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_URL")
        .env_remove("FERRY_TOKEN")
        .env_remove("FERRY_STORE")
        .env("FERRY_LOG", "warn");
    c
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_every(timeout, Duration::from_millis(100), f).await
}

/// Polls `f` every `period` until it returns true or `timeout` passes.
pub async fn eventually_every<F, Fut>(timeout: Duration, period: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(period).await;
    }
    false
}
