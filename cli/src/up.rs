//! `ferry up`: every component in one process on the embedded store. The same
//! [`Cluster`] is the in-process harness the tests run against.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use ferry_core::config::Env;
use ferry_store::Store;

use crate::UpArgs;
use crate::settings::{resolve_up, socket_addr};

/// (No `Debug`: it holds the token.)
#[derive(Clone)]
pub struct UpConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub token: String,
    pub nodes: u32,
    /// Failure detection and circuit breaking of the order-server.
    pub tuning: Tuning,
    /// Variables every native function gets (after `FERRY_API_URL`/`FERRY_API_TOKEN`),
    /// e.g. the object store's `AWS_*` settings.
    pub function_env: Vec<(String, String)>,
    /// How the node agents limit native functions.
    pub cgroup: ferry_runtime::cgroup::CgroupSetting,
}

/// The order-server's failure detection, circuit breakers, retention and callbacks.
/// (No `Debug`: it holds the callback secret.)
#[derive(Clone)]
pub struct Tuning {
    pub suspect_after: std::time::Duration,
    pub dead_after: std::time::Duration,
    pub breaker: ferry_order_server::BreakerConfig,
    pub task_retention: std::time::Duration,
    pub callback_secret: Option<String>,
}

impl Default for Tuning {
    fn default() -> Self {
        let d = ferry_order_server::Config::default();
        Self {
            suspect_after: d.suspect_after,
            dead_after: d.dead_after,
            breaker: d.breaker,
            task_retention: d.task_retention,
            callback_secret: d.callback_secret,
        }
    }
}

/// A whole Ferry in one process.
pub struct Cluster {
    pub url: String,
    pub token: String,
    pub data_dir: PathBuf,
    pub store: Arc<dyn Store>,
    gateway: ferry_gateway::Running,
    scheduler: ferry_cluster_scheduler::Running,
    order_server: ferry_order_server::Running,
    agents: Vec<ferry_order_client::Running>,
    agent_settings: AgentSettings,
}

/// What every node agent of the cluster is started with.
struct AgentSettings {
    cgroup: ferry_runtime::cgroup::CgroupSetting,
    function_env: Vec<(String, String)>,
}

impl Cluster {
    pub async fn start(cfg: UpConfig) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("create {}", cfg.data_dir.display()))?;
        let store_dir = cfg.data_dir.join("store");
        let store = ferry_store::open(&format!("embedded:{}", store_dir.display()))
            .await
            .context("open the embedded store")?;
        let scheduler = ferry_cluster_scheduler::start(store.clone())
            .await
            .context("start the cluster-scheduler")?;
        let order_server = ferry_order_server::start(
            ferry_order_server::Config {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                token: cfg.token.clone(),
                suspect_after: cfg.tuning.suspect_after,
                dead_after: cfg.tuning.dead_after,
                breaker: cfg.tuning.breaker,
                task_retention: cfg.tuning.task_retention,
                callback_secret: cfg.tuning.callback_secret.clone(),
                ..Default::default()
            },
            store.clone(),
        )
        .await
        .context("start the order-server")?;
        let gateway = ferry_gateway::start(
            ferry_gateway::Config {
                listen: cfg.listen,
                token: cfg.token.clone(),
                data_dir: cfg.data_dir.clone(),
                callback_secret: cfg.tuning.callback_secret.clone(),
                ..Default::default()
            },
            store.clone(),
        )
        .await
        .context("start the gateway")?;
        let mut cluster = Cluster {
            url: gateway.url.clone(),
            token: cfg.token.clone(),
            data_dir: cfg.data_dir.clone(),
            store,
            gateway,
            scheduler,
            order_server,
            agents: vec![],
            agent_settings: AgentSettings {
                cgroup: cfg.cgroup.clone(),
                function_env: cfg.function_env.clone(),
            },
        };
        for i in 1..=cfg.nodes {
            let agent = cluster.start_agent(i as usize)?;
            cluster.agents.push(agent);
        }
        Ok(cluster)
    }

    /// Starts node agent `node-{i}` (1-based) on its cache folder under the data dir.
    fn start_agent(&self, i: usize) -> anyhow::Result<ferry_order_client::Running> {
        let node_id = format!("node-{i}");
        let cache_dir = self.data_dir.join("nodes").join(&node_id);
        let runtime = ferry_runtime::Runtime::new(ferry_runtime::Config {
            cache_dir: cache_dir.clone(),
            cgroup: self.agent_settings.cgroup.clone(),
            ..Default::default()
        })
        .with_context(|| format!("start the runtime of {node_id}"))?;
        let mut c = ferry_order_client::Config::detect(node_id);
        c.order_servers = vec![self.order_server.url.clone()];
        c.gateway = Some(self.url.clone());
        c.token = Some(self.token.clone());
        c.cache_dir = cache_dir;
        // Functions that submit tasks of their own (the transcode's segments) call
        // this gateway with the cluster credential.
        c.function_env = vec![
            ("FERRY_API_URL".into(), self.url.clone()),
            ("FERRY_API_TOKEN".into(), self.token.clone()),
        ];
        c.function_env
            .extend(self.agent_settings.function_env.iter().cloned());
        Ok(ferry_order_client::start(
            c,
            Some(self.store.clone()),
            runtime,
        ))
    }

    /// Stops node agent `index` (0-based) and starts it again with the same id and
    /// cache: its stream closes, and the new agent attaches afresh.
    pub async fn restart_node(&mut self, index: usize) -> anyhow::Result<()> {
        if index >= self.agents.len() {
            anyhow::bail!("there is no node agent {index}");
        }
        let old = self.agents.remove(index);
        old.shutdown().await;
        let agent = self.start_agent(index + 1)?;
        self.agents.insert(index, agent);
        Ok(())
    }

    /// The order-server's gRPC URL.
    pub fn order_server_url(&self) -> &str {
        &self.order_server.url
    }

    /// Waits (bounded) until `n` nodes are routable, so a first invocation finds them.
    pub async fn wait_for_nodes(&self, n: u32, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(kv)) = self.store.get(ferry_core::keys::ROUTING).await
                && let Ok(t) = serde_json::from_slice::<ferry_core::model::RoutingTable>(&kv.value)
                && t.clusters
                    .iter()
                    .map(|c| c.order_servers.iter().map(|s| s.nodes).sum::<u32>())
                    .sum::<u32>()
                    >= n
            {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops node agent `index` (0-based), as if its machine went away: its stream
    /// closes and the order-server fails its work over.
    pub async fn stop_node(&mut self, index: usize) {
        if index < self.agents.len() {
            self.agents.remove(index).shutdown().await;
        }
    }

    pub async fn shutdown(self) {
        for a in self.agents {
            a.shutdown().await;
        }
        self.gateway.shutdown().await;
        self.order_server.shutdown().await;
        self.scheduler.shutdown();
    }
}

/// The admin token: given, or generated once and kept in `DATA_DIR/token` (mode 0600).
pub fn load_or_create_token(data_dir: &Path, given: Option<String>) -> anyhow::Result<String> {
    load_or_create_secret(data_dir, "token", given)
}

/// A secret: given, or generated once and kept in `DATA_DIR/NAME` (mode 0600).
pub fn load_or_create_secret(
    data_dir: &Path,
    name: &str,
    given: Option<String>,
) -> anyhow::Result<String> {
    if let Some(t) = given {
        return Ok(t);
    }
    let path = data_dir.join(name);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let token = ferry_core::id::new_secret();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(&path) {
        Ok(mut f) => std::io::Write::write_all(&mut f, token.as_bytes())
            .with_context(|| format!("write {}", path.display()))?,
        // Another `ferry up` got there first (or an empty file was left): use what is
        // there if anything, else overwrite it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let existing = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_string();
            if !existing.is_empty() {
                return Ok(existing);
            }
            std::fs::write(&path, &token).with_context(|| format!("write {}", path.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("write {}", path.display())),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restrict {}", path.display()))?;
    }
    Ok(token)
}

pub async fn run(args: UpArgs, env: &Env) -> anyhow::Result<ExitCode> {
    let s = resolve_up(&args, env)?;
    let function_env = crate::settings::function_env(&s, env)?;
    let cgroup = crate::settings::cgroup(&s)?;
    let mut tuning = crate::settings::tuning(&s)?;
    let data_dir = s.data_dir.unwrap_or_else(|| PathBuf::from(".ferry"));
    let listen = socket_addr(s.listen.as_deref().unwrap_or("127.0.0.1:7070"))?;
    let token = load_or_create_token(&data_dir, s.token)?;
    // Callbacks are signed with a secret of their own (never the admin token).
    tuning.callback_secret = Some(load_or_create_secret(
        &data_dir,
        "callback-secret",
        tuning.callback_secret.take(),
    )?);
    let nodes = s.nodes.unwrap_or(2);
    let cluster = Cluster::start(UpConfig {
        listen,
        data_dir: data_dir.clone(),
        token: token.clone(),
        nodes,
        tuning,
        function_env,
        cgroup,
    })
    .await?;
    cluster
        .wait_for_nodes(nodes, std::time::Duration::from_secs(10))
        .await;
    println!(
        "Ferry is up: gateway {} · {} node agents · data in {}",
        cluster.url,
        nodes,
        data_dir.display()
    );
    println!("  export FERRY_URL={}", cluster.url);
    println!("  export FERRY_TOKEN={token}");
    println!(
        "Try: ferry deploy functions/hello && ferry invoke hello --data '{{\"name\":\"ada\"}}'"
    );
    crate::shutdown_signal().await;
    println!("Stopping…");
    cluster.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
