//! `ferry bench`: measurements, never assertions. Each prints its figures and the
//! machine they ran on, with ratios against a baseline measured in the same run where
//! one exists.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use ferry_core::config::Env;
use http_body_util::{BodyExt, Full};

use crate::ClientArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The sync invoke path over HTTP: warm latency and throughput, and cold starts.
    Invoke(InvokeBench),
    /// The order-server with simulated nodes: tasks placed and committed per second,
    /// failure detection and re-placement.
    Schedule(crate::bench_schedule::ScheduleBench),
    /// The gateway's own cost per request (auth, limits, routing, idempotency lookup)
    /// apart from the function, and how fast it refuses with 429.
    Gateway(crate::bench_gateway::GatewayBench),
}

#[derive(Args, Debug)]
pub struct InvokeBench {
    /// Function folder to deploy and invoke
    #[arg(long, default_value = "functions/hello")]
    pub function: PathBuf,
    /// Concurrent callers (one keep-alive connection each)
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds of measured load (after one second of warm-up)
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Request body
    #[arg(long, default_value = r#"{"name":"ada"}"#)]
    pub data: String,
    /// Cold starts to measure (each deploys a fresh version)
    #[arg(long, default_value_t = 5)]
    pub cold_runs: usize,
    /// Benchmark a running gateway instead of starting an in-process cluster
    #[arg(long)]
    pub external: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(cmd: BenchCommand, env: &Env) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Invoke(b) => invoke(b, env).await,
        BenchCommand::Schedule(b) => crate::bench_schedule::run(b).await,
        BenchCommand::Gateway(b) => crate::bench_gateway::run(b).await,
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub p50: u64,
    pub p99: u64,
    pub mean: u64,
    pub max: u64,
}

pub fn summarize(mut v: Vec<u64>) -> Summary {
    if v.is_empty() {
        return Summary {
            count: 0,
            p50: 0,
            p99: 0,
            mean: 0,
            max: 0,
        };
    }
    v.sort_unstable();
    let pct = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    Summary {
        count: v.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        mean: v.iter().sum::<u64>() / v.len() as u64,
        max: v[v.len() - 1],
    }
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}")
}

async fn invoke(b: InvokeBench, env: &Env) -> anyhow::Result<ExitCode> {
    let (cluster, client) = if b.external {
        (None, crate::client::connect(&b.client, env))
    } else {
        let dir = tempfile::tempdir().context("create a temporary data dir")?;
        let token = ferry_core::id::new_secret();
        let cluster = crate::up::Cluster::start(crate::up::UpConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.path().to_path_buf(),
            token: token.clone(),
            nodes: 2,
            tuning: Default::default(),
            function_env: vec![],
            cgroup: Default::default(),
        })
        .await?;
        anyhow::ensure!(
            cluster.wait_for_nodes(2, Duration::from_secs(10)).await,
            "node agents did not attach"
        );
        let client = ferry_sdk::client::Client::new(cluster.url.clone(), Some(token));
        (Some((cluster, dir)), client)
    };

    println!(
        "ferry bench invoke · {} · {} callers · {} s",
        machine(),
        b.concurrency,
        b.seconds
    );
    let (manifest, package) = ferry_core::package::pack_dir(&b.function)
        .with_context(|| format!("package {}", b.function.display()))?;
    client
        .deploy(&manifest.name, package)
        .await
        .context("deploy")?;
    // First call compiles; not part of the warm figures.
    client
        .invoke(&manifest.name, b.data.clone().into_bytes())
        .await
        .context("first invocation")?;

    let url: hyper::Uri = format!(
        "{}/v1/functions/{}/invoke",
        client.base_url(),
        manifest.name
    )
    .parse()
    .context("gateway URL")?;
    let bearer = match &cluster {
        Some((c, _)) => format!("Bearer {}", c.token),
        None => format!(
            "Bearer {}",
            crate::client::token(&b.client, env).unwrap_or_default()
        ),
    };
    // One second of warm-up, not counted.
    load(
        &url,
        &bearer,
        Bytes::from(b.data.clone()),
        b.concurrency,
        Duration::from_secs(1),
    )
    .await?;
    // Baselines measured in this same run, so the figures can be read on any machine:
    // a bare HTTP server on loopback (the floor for one HTTP round trip with this load
    // generator), and the runtime alone (instantiate + run + drop of the component).
    let bare = BareHttp::start().await?;
    let bare_url: hyper::Uri = format!("http://{}/", bare.addr)
        .parse()
        .context("bare URL")?;
    let runtime_alone = runtime_baseline(&b.function, &b.data).await?;
    // Latency is read with one caller (nothing queues); throughput with many (where
    // latency is mostly queueing: in-flight / throughput, by Little's law).
    for (label, callers, secs) in [
        ("1 caller", 1, b.seconds.div_ceil(2)),
        ("loaded", b.concurrency, b.seconds),
    ] {
        let body = Bytes::from(b.data.clone());
        let (ferry, ferry_rate) = timed_load(&url, &bearer, body.clone(), callers, secs).await?;
        let (base, base_rate) = timed_load(&bare_url, &bearer, body, callers, secs).await?;
        println!(
            "warm, {label} ({callers} in flight): ferry {ferry_rate:.0}/s, p50 {:.3} ms, p99 {:.3} ms ({} errors) · bare HTTP {base_rate:.0}/s, p50 {:.3} ms, p99 {:.3} ms · ferry/bare: p50 {:.1}x, throughput {:.2}x",
            ferry.0.p50 as f64 / 1000.0,
            ferry.0.p99 as f64 / 1000.0,
            ferry.1,
            base.0.p50 as f64 / 1000.0,
            base.0.p99 as f64 / 1000.0,
            ferry.0.p50 as f64 / base.0.p50.max(1) as f64,
            ferry_rate / base_rate.max(1.0),
        );
    }
    println!(
        "runtime alone (instantiate + run + drop, one thread): p50 {} µs, p99 {} µs",
        runtime_alone.p50, runtime_alone.p99
    );
    bare.stop();

    // Cold starts: each run deploys a version with new bytes (a nonce file).
    let mut cold = vec![];
    let mut prefetched = vec![];
    for i in 0..b.cold_runs * 2 {
        let nonce = ferry_core::package::PackFile {
            path: ".bench-nonce".into(),
            bytes: ferry_core::id::new_id().into_bytes(),
            executable: false,
        };
        let (m, pkg) = ferry_core::package::pack_dir_with(&b.function, vec![nonce])?;
        let v = client
            .deploy(&m.name, pkg)
            .await
            .context("deploy a fresh version")?;
        let name = format!("{}:{}", m.name, v["version"]);
        let waited = i % 2 == 1;
        if waited {
            // Give the nodes' prefetch time to compile before the first call.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let t = Instant::now();
        client
            .invoke(&name, b.data.clone().into_bytes())
            .await
            .context("cold invocation")?;
        let us = t.elapsed().as_micros() as u64;
        if waited {
            prefetched.push(us)
        } else {
            cold.push(us)
        }
    }
    let c = summarize(cold);
    let p = summarize(prefetched);
    println!(
        "cold  : first call right after deploy (fetch + compile + run): p50 {:.1} ms, max {:.1} ms over {} runs",
        c.p50 as f64 / 1000.0,
        c.max as f64 / 1000.0,
        c.count
    );
    println!(
        "cold  : first call after the nodes prefetched the new version: p50 {:.1} ms, max {:.1} ms over {} runs",
        p.p50 as f64 / 1000.0,
        p.max as f64 / 1000.0,
        p.count
    );
    if let Some((c, _dir)) = cluster {
        c.shutdown().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs [`load`] for `secs` seconds: (latency summary, errors) and requests per second.
async fn timed_load(
    url: &hyper::Uri,
    bearer: &str,
    body: Bytes,
    callers: usize,
    secs: u64,
) -> anyhow::Result<((Summary, usize), f64)> {
    let started = Instant::now();
    let (lat, errors) = load(url, bearer, body, callers, Duration::from_secs(secs)).await?;
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    Ok(((summarize(lat), errors), rate))
}

/// The smallest useful HTTP server: hyper, HTTP/1.1 keep-alive, a fixed JSON answer.
pub(crate) struct BareHttp {
    pub(crate) addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl BareHttp {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the bare server")?;
        let addr = listener.local_addr().context("bare server address")?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(br#"{"greeting":"Hello, ada!"}"#),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

/// The runtime alone: the function's component instantiated, run and dropped in a loop
/// on one plain thread (no HTTP, no scheduling).
async fn runtime_baseline(dir: &std::path::Path, data: &str) -> anyhow::Result<Summary> {
    let (manifest, package) = ferry_core::package::pack_dir(dir)?;
    let sha = ferry_core::id::sha256_hex(&package);
    let cache = tempfile::tempdir().context("runtime cache dir")?;
    let runtime = ferry_runtime::Runtime::new(ferry_runtime::Config {
        cache_dir: cache.path().to_path_buf(),
        ..Default::default()
    })
    .map_err(ferry_core::Error::from)?;
    let req = ferry_runtime::Request {
        input: data.as_bytes().to_vec(),
        limits: manifest.limits,
        function: manifest.name,
        version: 1,
        request_id: "bench".into(),
        progress: None,
        env: vec![],
    };
    let handle = std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
        runtime
            .prepare(&sha, &package)
            .map_err(ferry_core::Error::from)?;
        let mut lat = Vec::with_capacity(20_000);
        for i in 0..22_000 {
            let t = Instant::now();
            runtime
                .invoke_wasm_blocking(&sha, &req)
                .map_err(ferry_core::Error::from)?;
            if i >= 2_000 {
                lat.push(t.elapsed().as_micros() as u64);
            }
        }
        Ok(lat)
    });
    let lat = tokio::task::spawn_blocking(move || handle.join())
        .await
        .context("join")?
        .map_err(|_| anyhow::anyhow!("runtime baseline panicked"))??;
    Ok(summarize(lat))
}

/// `concurrency` keep-alive HTTP/1.1 connections sending requests back to back for
/// `dur`; returns the latencies (µs) of successful calls and the error count.
async fn load(
    url: &hyper::Uri,
    bearer: &str,
    body: Bytes,
    concurrency: usize,
    dur: Duration,
) -> anyhow::Result<(Vec<u64>, usize)> {
    let host = url
        .authority()
        .map(|a| a.to_string())
        .context("URL without host")?;
    let deadline = Instant::now() + dur;
    let mut tasks = vec![];
    for _ in 0..concurrency {
        let (url, bearer, body, host) =
            (url.clone(), bearer.to_string(), body.clone(), host.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(16_384);
            let mut errors = 0usize;
            let stream = tokio::net::TcpStream::connect(&host).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            while Instant::now() < deadline {
                let req = hyper::Request::post(url.clone())
                    .header(hyper::header::HOST, &host)
                    .header(hyper::header::AUTHORIZATION, &bearer)
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))?;
                let t = Instant::now();
                let resp = sender.send_request(req).await?;
                let ok = resp.status().is_success();
                resp.into_body().collect().await?;
                if ok {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let mut all = vec![];
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.context("load task")??;
        all.extend(l);
        errors += e;
    }
    Ok((all, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = summarize((1..=100).collect());
        assert_eq!((s.p50, s.p99, s.max, s.mean), (50, 99, 100, 50));
        assert_eq!(summarize(vec![]).count, 0);
    }
}
