//! Resolving settings: config file → environment (`FERRY_…`) → flags.

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

pub fn resolve_serve(a: &ServeArgs, env: &Env) -> anyhow::Result<Settings> {
    let f: FileConfig = load_file(a.config.as_deref()).context("load the config file")?;
    let sched = scheduler(env, &f)?;
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
}
