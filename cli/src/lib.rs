//! The `ferry` command: the single-machine cluster (`up`), each component on its own
//! (`gateway`, `order-server`, `order-client`, `cluster-scheduler`), the client
//! commands (`deploy`, `invoke`, `functions`, `nodes`, `clusters`), local runs (`run`)
//! and benchmarks (`bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferry_core::config::Env;

pub mod admin;
pub mod alias;
pub mod bench;
pub mod bench_gateway;
pub mod bench_schedule;
pub mod client;
pub mod components;
pub mod nodes;
pub mod ops;
pub mod queues;
pub mod rerun;
pub mod settings;
pub mod up;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: serverless functions for media processing"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run everything on this machine in one process, on the embedded store.
    Up(UpArgs),
    /// Run a gateway (HTTP front door).
    Gateway(ServeArgs),
    /// Run an order-server (a cluster's central scheduler).
    OrderServer(ServeArgs),
    /// Run a node agent.
    OrderClient(ServeArgs),
    /// Run the cluster-scheduler (publishes the routing table).
    ClusterScheduler(ServeArgs),
    /// Package a function folder (its ferry.toml) and upload it as a new version.
    Deploy(DeployArgs),
    /// Invoke a function synchronously and print its output.
    Invoke(InvokeArgs),
    /// Show one async task (`--wait` until it ends).
    Task(TaskArgs),
    /// List async tasks, newest first.
    Tasks(TasksArgs),
    /// Cancel an async task.
    Cancel(TaskArgs),
    /// Print the secret your task callbacks are signed with (X-Ferry-Signature).
    CallbackSecret(ClientArgs),
    /// List functions and their latest versions.
    Functions(ClientArgs),
    /// List a function's versions.
    Versions(VersionsArgs),
    /// List node agents: state, usage, running tasks, circuit breakers.
    Nodes(ClientArgs),
    /// Drain, eject or restore a node.
    #[command(subcommand)]
    Node(nodes::NodeCommand),
    /// Show the routing table (clusters and their order-servers).
    Clusters(ClientArgs),
    /// Run a function folder locally through the runtime, without any server.
    Run(RunArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Aliases: `ferry alias set transcode prod 3=90 4=10`.
    #[command(subcommand)]
    Alias(alias::AliasCommand),
    /// Batch re-runs: `ferry rerun start transcode --state failed`, `ferry rerun status ID`.
    #[command(subcommand)]
    Rerun(rerun::RerunCommand),
    /// Queues and their QPS, MRT and default class, with queued and running tasks.
    Queues(ClientArgs),
    /// Set or delete a queue (admin token): `ferry queue set acme.uploads --mrt 8`.
    #[command(subcommand)]
    Queue(queues::QueueCommand),
    /// Tenants and their limits (admin token).
    #[command(subcommand)]
    Tenants(admin::TenantsCommand),
    /// Tenants' API keys (admin token).
    #[command(subcommand)]
    Keys(admin::KeysCommand),
}

#[derive(Args, Debug, Default, Clone)]
pub struct UpArgs {
    /// Config file (TOML); flags and FERRY_* variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Gateway address [env: FERRY_LISTEN] [default: 127.0.0.1:7070]
    #[arg(long)]
    pub listen: Option<String>,
    /// Where data lives [env: FERRY_DATA_DIR] [default: ./.ferry]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Admin token [env: FERRY_TOKEN] [default: generated once, kept in DATA_DIR/token]
    #[arg(long)]
    pub token: Option<String>,
    /// Node agents to run [env: FERRY_NODES] [default: 2]
    #[arg(long)]
    pub nodes: Option<u32>,
    #[command(flatten)]
    pub functions: NodeFunctionArgs,
}

/// The node agents' settings for the native functions they run (`ferry up` and
/// `ferry order-client`).
#[derive(Args, Debug, Default, Clone)]
pub struct NodeFunctionArgs {
    /// Node agents: a variable given to every native function, KEY=VALUE (repeatable;
    /// adds to the config file's [function_env])
    #[arg(long = "function-env", value_name = "KEY=VALUE")]
    pub function_env: Vec<String>,
    /// Node agents: a variable copied from this process's environment into every
    /// native function's, e.g. AWS_SECRET_ACCESS_KEY (repeatable) [env: FERRY_FUNCTION_ENV_PASS, comma-separated]
    #[arg(long = "function-env-pass", value_name = "NAME")]
    pub function_env_pass: Vec<String>,
    /// Node agents: native function limits: auto, off (rlimits only) or a delegated cgroup v2 directory [env: FERRY_CGROUP] [default: auto]
    #[arg(long)]
    pub cgroup: Option<String>,
}

#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// Config file (TOML); flags and FERRY_* variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Store URL: etcd://HOST:PORT[,HOST:PORT] or embedded:DIR [env: FERRY_STORE]
    #[arg(long)]
    pub store: Option<String>,
    /// Listen address [env: FERRY_LISTEN]
    #[arg(long)]
    pub listen: Option<String>,
    /// Order-server, node agent, cluster-scheduler: serve /healthz, /readyz and /metrics
    /// here [env: FERRY_OPS_LISTEN] [default: off]
    #[arg(long)]
    pub ops_listen: Option<String>,
    /// Token (gateway: the admin token; node agent: to fetch packages) [env: FERRY_TOKEN]
    #[arg(long)]
    pub token: Option<String>,
    /// Data directory (gateway packages, node cache) [env: FERRY_DATA_DIR]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Cluster name [env: FERRY_CLUSTER] [default: local]
    #[arg(long)]
    pub cluster: Option<String>,
    /// Instance or node id [env: FERRY_ID] [default: random / hostname-based]
    #[arg(long)]
    pub id: Option<String>,
    /// URL others use to reach this component, when it differs from --listen [env: FERRY_ADVERTISE]
    #[arg(long)]
    pub advertise: Option<String>,
    /// Node agent: gateway to fetch packages from [env: FERRY_GATEWAY] [default: discovered in the store]
    #[arg(long)]
    pub gateway: Option<String>,
    /// Node agent: order-server to attach to (repeatable) [default: discovered in the store]
    #[arg(long = "order-server")]
    pub order_servers: Vec<String>,
    /// Node agent: concurrent tasks at most [env: FERRY_SLOTS] [default: 64]
    #[arg(long)]
    pub slots: Option<u32>,
    /// Node agent: CPU to offer, in millicores [default: all CPUs]
    #[arg(long)]
    pub cpu_millis: Option<u64>,
    /// Node agent: memory to offer, in MiB [default: all memory]
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Node agent: extra tags (repeatable), e.g. gpu
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    #[command(flatten)]
    pub functions: NodeFunctionArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Gateway URL [env: FERRY_URL] [default: http://127.0.0.1:7070]
    #[arg(long)]
    pub url: Option<String>,
    /// Token [env: FERRY_TOKEN] [default: ./.ferry/token when present]
    #[arg(long)]
    pub token: Option<String>,
    /// Print raw JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DeployArgs {
    /// Folder holding ferry.toml
    pub dir: PathBuf,
    /// Run ferry.toml's [build] command first
    #[arg(long)]
    pub build: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct InvokeArgs {
    /// Function name, or NAME:VERSION
    pub name: String,
    /// Input: inline JSON, @FILE, or - for stdin [default: {}]
    #[arg(long, short = 'd')]
    pub data: Option<String>,
    /// Send the input as raw bytes (application/octet-stream) instead of JSON
    #[arg(long)]
    pub raw: bool,
    /// Print version, node and timing to stderr
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Submit as an async task and print its id (durable, retried)
    #[arg(long = "async")]
    pub is_async: bool,
    /// With --async: wait for the task to end and print its output
    #[arg(long)]
    pub wait: bool,
    /// With --async: critical, normal or batch [default: the queue's class]
    #[arg(long)]
    pub priority: Option<String>,
    /// With --async: the queue it waits in [default: default]
    #[arg(long)]
    pub queue: Option<String>,
    /// With --async: the same key within 24 h returns the same task
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct TaskArgs {
    pub id: String,
    /// Wait (up to this many seconds) until the task ends
    #[arg(long)]
    pub wait: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct TasksArgs {
    #[arg(long)]
    pub function: Option<String>,
    /// queued, running, succeeded, failed, timed_out, cancelled or dead
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Continue a listing where the last page stopped (the cursor it printed)
    #[arg(long)]
    pub after: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct VersionsArgs {
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Folder holding ferry.toml
    pub dir: PathBuf,
    /// Input: inline JSON, @FILE, or - for stdin [default: {}]
    #[arg(long, short = 'd')]
    pub data: Option<String>,
    /// Runtime cache folder [default: ./.ferry/run-cache]
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// A variable for a native function, KEY=VALUE (repeatable), as a node's function_env gives it
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub function_env: Vec<String>,
    /// A variable copied from this process's environment into a native function's (repeatable)
    #[arg(long = "env-pass", value_name = "NAME")]
    pub function_env_pass: Vec<String>,
}

/// Runs a parsed command line; prints errors as one line and maps them to exit codes.
pub fn main(cli: Cli, env: Env) -> ExitCode {
    let default_log = match cli.command {
        Command::Up(_)
        | Command::Gateway(_)
        | Command::OrderServer(_)
        | Command::OrderClient(_)
        | Command::ClusterScheduler(_) => "info",
        _ => "warn",
    };
    ferry_core::telemetry::init(&env, default_log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command, env)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

/// 2: bad usage or input; 3: not found; 4: the function failed; 1: anything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(ferry_sdk::client::ClientError::Api { status, code, .. }) = cause.downcast_ref()
        {
            return match (*status, code.as_str()) {
                (_, "function_error") => 4,
                (404, _) => 3,
                (400..=499, _) => 2,
                _ => 1,
            };
        }
        if let Some(fe) = cause.downcast_ref::<ferry_core::Error>() {
            return match fe.code.http_status() {
                404 => 3,
                400..=499 => 2,
                _ => 1,
            };
        }
    }
    1
}

async fn dispatch(cmd: Command, env: Env) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Up(a) => up::run(a, &env).await,
        Command::Gateway(a) => components::gateway(a, &env).await,
        Command::OrderServer(a) => components::order_server(a, &env).await,
        Command::OrderClient(a) => components::order_client(a, &env).await,
        Command::ClusterScheduler(a) => components::cluster_scheduler(a, &env).await,
        Command::Deploy(a) => client::deploy(a, &env).await,
        Command::Invoke(a) => client::invoke(a, &env).await,
        Command::Task(a) => client::task(a, &env).await,
        Command::Tasks(a) => client::tasks(a, &env).await,
        Command::Cancel(a) => client::cancel(a, &env).await,
        Command::CallbackSecret(a) => client::callback_secret(a, &env).await,
        Command::Functions(a) => client::functions(a, &env).await,
        Command::Versions(a) => client::versions(a, &env).await,
        Command::Nodes(a) => nodes::list(a, &env).await,
        Command::Node(c) => nodes::admin(c, &env).await,
        Command::Clusters(a) => client::clusters(a, &env).await,
        Command::Run(a) => client::run_local(a, &env).await,
        Command::Bench(b) => bench::run(b, &env).await,
        Command::Alias(c) => alias::run(c, &env).await,
        Command::Rerun(c) => rerun::run(c, &env).await,
        Command::Queues(a) => queues::list(a, &env).await,
        Command::Queue(c) => queues::admin(c, &env).await,
        Command::Tenants(c) => admin::tenants(c, &env).await,
        Command::Keys(c) => admin::keys(c, &env).await,
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
