//! Resolving settings: config file → environment (`FERRY_…`) → flags.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use ferry_core::config::{Env, load_file};
use serde::Deserialize;

use crate::{ServeArgs, UpArgs};

/// Everything a config file may set (each component reads what concerns it).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    /// Order-server, node agent, cluster-scheduler: where /healthz, /readyz and
    /// /metrics are served (off when unset).
    pub ops_listen: Option<String>,
    pub store: Option<String>,
    pub token: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub cluster: Option<String>,
    pub id: Option<String>,
    pub advertise: Option<String>,
    pub gateway: Option<String>,
    pub order_servers: Vec<String>,
    pub slots: Option<u32>,
    pub cpu_millis: Option<u64>,
    pub memory_mb: Option<u64>,
    pub tags: Vec<String>,
    pub nodes: Option<u32>,
    /// Order-server: silence before a node is suspect / dead.
    pub suspect_after_ms: Option<u64>,
    pub dead_after_ms: Option<u64>,
    /// Order-server circuit breakers: failures in a row that eject, the first
    /// ejection's length (the n-th lasts n times it), its cap, and the most of a pool
    /// ejected at once (percent).
    pub breaker_consecutive: Option<u32>,
    pub breaker_ejection_ms: Option<u64>,
    pub breaker_max_ejection_ms: Option<u64>,
    pub breaker_max_ejected_percent: Option<u32>,
    /// Order-server: finished tasks are removed this long after they finish.
    pub task_retention_s: Option<u64>,
    /// Order-server: key of the HMAC signature on task callbacks.
    pub callback_secret: Option<String>,
    /// Node agents: variables given to every native function (`[function_env]`, e.g.
    /// the object store's `AWS_ENDPOINT_URL`); `--function-env KEY=VALUE` adds to it.
    pub function_env: BTreeMap<String, String>,
    /// Node agents: names of variables copied from the agent's own environment into
    /// every native function's, so that secrets (`AWS_SECRET_ACCESS_KEY`) stay out of
    /// files and command lines.
    pub function_env_pass: Vec<String>,
    /// Node agents: how native functions are limited: `auto` (a cgroup v2 per
    /// invocation where the agent's own cgroup allows it), `off` (rlimits only), or the
    /// path of a delegated cgroup v2 directory.
    pub cgroup: Option<String>,
}

/// The first of flag, environment variable and file value that is set.
fn pick<T: FromStr>(
    flag: Option<T>,
    env: &Env,
    key: &str,
    file: Option<T>,
) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    if flag.is_some() {
        return Ok(flag);
    }
    if let Some(v) = env.parse::<T>(key).context("read the environment")? {
        return Ok(Some(v));
    }
    Ok(file)
}

/// Settings after layering; `None` means "the component's default".
pub type Settings = FileConfig;

/// Layers the node agents' keys: `function_env` is the file's table plus the flags'
/// `KEY=VALUE`s (a flag wins on the same key); `function_env_pass` and `cgroup` are
/// flags, else `FERRY_FUNCTION_ENV_PASS` (comma-separated) / `FERRY_CGROUP`, else the
/// file.
fn node_settings(
    a: &crate::NodeFunctionArgs,
    env: &Env,
    f: &FileConfig,
) -> anyhow::Result<FileConfig> {
    let mut function_env = f.function_env.clone();
    for kv in &a.function_env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("function_env {kv:?}: expected KEY=VALUE"))?;
        function_env.insert(k.to_string(), v.to_string());
    }
    let function_env_pass = if !a.function_env_pass.is_empty() {
        a.function_env_pass.clone()
    } else if let Some(list) = env.get("FERRY_FUNCTION_ENV_PASS") {
        list.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect()
    } else {
        f.function_env_pass.clone()
    };
    Ok(FileConfig {
        function_env,
        function_env_pass,
        cgroup: pick(a.cgroup.clone(), env, "FERRY_CGROUP", f.cgroup.clone())?,
        ..FileConfig::default()
    })
}

fn valid_env_name(n: &str) -> bool {
    n.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The variables every native function gets from its node (beyond what the node sets
/// itself): the fixed ones, then the passed ones with their values from `env`. Errors
/// name variables, never values.
pub fn function_env(s: &Settings, env: &Env) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = vec![];
    for (k, v) in &s.function_env {
        anyhow::ensure!(
            valid_env_name(k),
            "function_env: {k:?} is not a variable name"
        );
        out.push((k.clone(), v.clone()));
    }
    for k in &s.function_env_pass {
        anyhow::ensure!(
            valid_env_name(k),
            "function_env_pass: {k:?} is not a variable name"
        );
        let v = env.get(k).with_context(|| {
            format!("function_env_pass names {k}, which is not set in this process's environment")
        })?;
        out.retain(|(n, _)| n != k);
        out.push((k.clone(), v.to_string()));
    }
    Ok(out)
}

/// `ferry run`'s variables for the function: `--env` values, then `--env-pass` names
/// with their values from `env` (checked like a node's `function_env`).
pub fn run_env(a: &crate::RunArgs, env: &Env) -> anyhow::Result<Vec<(String, String)>> {
    let s = node_settings(
        &crate::NodeFunctionArgs {
            function_env: a.function_env.clone(),
            function_env_pass: a.function_env_pass.clone(),
            cgroup: None,
        },
        &Env::default(),
        &FileConfig::default(),
    )?;
    function_env(&s, env)
}

/// The runtime's cgroup setting from `auto`, `off` or a directory.
pub fn cgroup(s: &Settings) -> anyhow::Result<ferry_runtime::cgroup::CgroupSetting> {
    use ferry_runtime::cgroup::CgroupSetting;
    Ok(match s.cgroup.as_deref() {
        None | Some("auto") => CgroupSetting::Auto,
        Some("off") => CgroupSetting::Off,
        Some(p) if p.starts_with('/') => CgroupSetting::Root(PathBuf::from(p)),
        Some(other) => anyhow::bail!(
            "cgroup {other:?}: expected auto, off or the absolute path of a delegated cgroup v2 directory"
        ),
    })
}

pub fn resolve_serve(a: &ServeArgs, env: &Env) -> anyhow::Result<Settings> {
    let f: FileConfig = load_file(a.config.as_deref()).context("load the config file")?;
    let sched = scheduler(env, &f)?;
    let node = node_settings(&a.functions, env, &f)?;
    Ok(FileConfig {
        listen: pick(a.listen.clone(), env, "FERRY_LISTEN", f.listen)?,
        ops_listen: pick(a.ops_listen.clone(), env, "FERRY_OPS_LISTEN", f.ops_listen)?,
        store: pick(a.store.clone(), env, "FERRY_STORE", f.store)?,
        token: pick(a.token.clone(), env, "FERRY_TOKEN", f.token)?,
        data_dir: pick(a.data_dir.clone(), env, "FERRY_DATA_DIR", f.data_dir)?,
        cluster: pick(a.cluster.clone(), env, "FERRY_CLUSTER", f.cluster)?,
        id: pick(a.id.clone(), env, "FERRY_ID", f.id)?,
        advertise: pick(a.advertise.clone(), env, "FERRY_ADVERTISE", f.advertise)?,
        gateway: pick(a.gateway.clone(), env, "FERRY_GATEWAY", f.gateway)?,
        order_servers: if a.order_servers.is_empty() {
            f.order_servers
        } else {
            a.order_servers.clone()
        },
        slots: pick(a.slots, env, "FERRY_SLOTS", f.slots)?,
        cpu_millis: pick(a.cpu_millis, env, "FERRY_CPU_MILLIS", f.cpu_millis)?,
        memory_mb: pick(a.memory_mb, env, "FERRY_MEMORY_MB", f.memory_mb)?,
        tags: if a.tags.is_empty() {
            f.tags
        } else {
            a.tags.clone()
        },
        nodes: None,
        function_env: node.function_env,
        function_env_pass: node.function_env_pass,
        cgroup: node.cgroup,
        ..sched
    })
}

/// The order-server's tuning keys: environment over file (no flags: these are rarely
/// changed, and a config file documents them better).
fn scheduler(env: &Env, f: &FileConfig) -> anyhow::Result<FileConfig> {
    Ok(FileConfig {
        suspect_after_ms: pick(None, env, "FERRY_SUSPECT_AFTER_MS", f.suspect_after_ms)?,
        dead_after_ms: pick(None, env, "FERRY_DEAD_AFTER_MS", f.dead_after_ms)?,
        breaker_consecutive: pick(
            None,
            env,
            "FERRY_BREAKER_CONSECUTIVE",
            f.breaker_consecutive,
        )?,
        breaker_ejection_ms: pick(
            None,
            env,
            "FERRY_BREAKER_EJECTION_MS",
            f.breaker_ejection_ms,
        )?,
        breaker_max_ejection_ms: pick(
            None,
            env,
            "FERRY_BREAKER_MAX_EJECTION_MS",
            f.breaker_max_ejection_ms,
        )?,
        breaker_max_ejected_percent: pick(
            None,
            env,
            "FERRY_BREAKER_MAX_EJECTED_PERCENT",
            f.breaker_max_ejected_percent,
        )?,
        task_retention_s: pick(None, env, "FERRY_TASK_RETENTION_S", f.task_retention_s)?,
        callback_secret: pick(
            None,
            env,
            "FERRY_CALLBACK_SECRET",
            f.callback_secret.clone(),
        )?,
        ..FileConfig::default()
    })
}

/// The order-server's failure detection and breakers from resolved settings.
pub fn tuning(s: &Settings) -> anyhow::Result<crate::up::Tuning> {
    use std::time::Duration;
    let mut t = crate::up::Tuning::default();
    if let Some(ms) = s.suspect_after_ms {
        t.suspect_after = Duration::from_millis(ms);
    }
    if let Some(ms) = s.dead_after_ms {
        t.dead_after = Duration::from_millis(ms);
    }
    if t.suspect_after >= t.dead_after {
        anyhow::bail!(
            "suspect_after_ms ({}) must be less than dead_after_ms ({})",
            t.suspect_after.as_millis(),
            t.dead_after.as_millis()
        );
    }
    if let Some(n) = s.breaker_consecutive {
        anyhow::ensure!(n >= 1, "breaker_consecutive must be at least 1");
        t.breaker.consecutive = n;
    }
    if let Some(ms) = s.breaker_ejection_ms {
        t.breaker.base_ejection = Duration::from_millis(ms);
    }
    if let Some(ms) = s.breaker_max_ejection_ms {
        t.breaker.max_ejection = Duration::from_millis(ms);
    }
    if let Some(p) = s.breaker_max_ejected_percent {
        anyhow::ensure!(p <= 100, "breaker_max_ejected_percent must be 0..=100");
        t.breaker.max_ejected_share = f64::from(p) / 100.0;
    }
    if let Some(secs) = s.task_retention_s {
        anyhow::ensure!(secs >= 1, "task_retention_s must be at least 1");
        t.task_retention = Duration::from_secs(secs);
    }
    t.callback_secret = s.callback_secret.clone();
    Ok(t)
}

pub fn resolve_up(a: &UpArgs, env: &Env) -> anyhow::Result<Settings> {
    let f: FileConfig = load_file(a.config.as_deref()).context("load the config file")?;
    let sched = scheduler(env, &f)?;
    let node = node_settings(&a.functions, env, &f)?;
    Ok(FileConfig {
        listen: pick(a.listen.clone(), env, "FERRY_LISTEN", f.listen)?,
        token: pick(a.token.clone(), env, "FERRY_TOKEN", f.token)?,
        data_dir: pick(a.data_dir.clone(), env, "FERRY_DATA_DIR", f.data_dir)?,
        nodes: pick(a.nodes, env, "FERRY_NODES", f.nodes)?,
        suspect_after_ms: sched.suspect_after_ms,
        dead_after_ms: sched.dead_after_ms,
        breaker_consecutive: sched.breaker_consecutive,
        breaker_ejection_ms: sched.breaker_ejection_ms,
        breaker_max_ejection_ms: sched.breaker_max_ejection_ms,
        breaker_max_ejected_percent: sched.breaker_max_ejected_percent,
        task_retention_s: sched.task_retention_s,
        callback_secret: sched.callback_secret,
        function_env: node.function_env,
        function_env_pass: node.function_env_pass,
        cgroup: node.cgroup,
        ..f
    })
}

/// Parses `HOST:PORT` with a readable error.
pub fn socket_addr(s: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .with_context(|| format!("parse listen address {s:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("listen address {s:?} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_env_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ferry.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\ncluster = \"file\"\nstore = \"embedded:/x\"\n",
        )
        .unwrap();
        let env = Env::from_pairs([
            ("FERRY_CLUSTER", "env"),
            ("FERRY_STORE", "etcd://127.0.0.1:2379"),
        ]);
        let args = ServeArgs {
            config: Some(file),
            store: Some("etcd://flag:1".into()),
            ..ServeArgs::default()
        };
        let s = resolve_serve(&args, &env).unwrap();
        assert_eq!(s.listen.as_deref(), Some("127.0.0.1:1"), "file");
        assert_eq!(s.cluster.as_deref(), Some("env"), "env beats file");
        assert_eq!(s.store.as_deref(), Some("etcd://flag:1"), "flag beats env");
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ferry.toml");
        std::fs::write(&file, "lisen = \"x\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        };
        let err = resolve_serve(&args, &Env::default()).unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
    }

    #[test]
    fn function_env_from_file_flags_and_the_agents_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ferry.toml");
        std::fs::write(
            &file,
            "function_env_pass = [\"FROM_FILE\"]\ncgroup = \"off\"\n[function_env]\nAWS_ENDPOINT_URL = \"http://file\"\nAWS_REGION = \"r1\"\n",
        )
        .unwrap();
        let env = Env::from_pairs([
            (
                "FERRY_FUNCTION_ENV_PASS",
                "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY",
            ),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
        ]);
        let args = ServeArgs {
            config: Some(file.clone()),
            functions: crate::NodeFunctionArgs {
                function_env: vec!["AWS_REGION=r2".into(), "X=a=b".into()],
                ..Default::default()
            },
            ..ServeArgs::default()
        };
        let s = resolve_serve(&args, &env).unwrap();
        let vars = function_env(&s, &env).unwrap();
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("AWS_ENDPOINT_URL"), Some("http://file"));
        assert_eq!(get("AWS_REGION"), Some("r2"), "a flag beats the file");
        assert_eq!(get("X"), Some("a=b"));
        assert_eq!(
            get("AWS_SECRET_ACCESS_KEY"),
            Some("s3cr3t"),
            "passed through"
        );
        assert_eq!(
            get("FROM_FILE"),
            None,
            "the environment's list beats the file's"
        );
        assert_eq!(
            cgroup(&s).unwrap(),
            ferry_runtime::cgroup::CgroupSetting::Off
        );

        // A passed name the agent does not have is an error that shows no value.
        let args = ServeArgs {
            config: Some(file),
            functions: crate::NodeFunctionArgs {
                function_env_pass: vec!["MISSING".into()],
                cgroup: Some("relative/dir".into()),
                ..Default::default()
            },
            ..ServeArgs::default()
        };
        let s = resolve_serve(&args, &env).unwrap();
        let e = function_env(&s, &env).unwrap_err().to_string();
        assert!(e.contains("MISSING") && !e.contains("s3cr3t"), "{e}");
        assert!(cgroup(&s).is_err());
        let bad = ServeArgs {
            functions: crate::NodeFunctionArgs {
                function_env: vec!["NOEQUALS".into()],
                ..Default::default()
            },
            ..ServeArgs::default()
        };
        assert!(resolve_serve(&bad, &env).is_err());
    }
}
