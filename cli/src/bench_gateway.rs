//! `ferry bench gateway`: what the gateway itself costs per request, apart from the
//! function, against a bare HTTP server measured in the same run.
//!
//! - **Own cost**: an idempotent repeat whose answer is stored takes the whole
//!   gateway path — tenant-key authentication (a sha256 and a lookup), the tenant's and
//!   the function's token buckets, name/alias/version resolution, the body, the
//!   idempotency lookup in the store — and answers without reaching an order-server.
//!   Its latency minus a bare HTTP round trip is the gateway's own cost.
//! - **Refusals**: a tenant over its QPS limit, many callers: 429s per second.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::bench::{BareHttp, machine, summarize};

#[derive(Args, Debug)]
pub struct GatewayBench {
    /// Concurrent callers for the refusal throughput (one keep-alive connection each)
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds per measurement (after half a second of warm-up)
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

/// `callers` keep-alive connections sending `req` back to back for `dur`: latencies (µs)
/// of answers with `want` status, and the count of others.
async fn load(
    url: &hyper::Uri,
    headers: &[(&'static str, String)],
    body: Bytes,
    want: u16,
    callers: usize,
    dur: Duration,
) -> anyhow::Result<(Vec<u64>, usize)> {
    let host = url
        .authority()
        .map(|a| a.to_string())
        .context("URL without host")?;
    let deadline = Instant::now() + dur;
    let mut tasks = vec![];
    for _ in 0..callers {
        let (url, headers, body, host) =
            (url.clone(), headers.to_vec(), body.clone(), host.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut other = 0usize;
            let stream = tokio::net::TcpStream::connect(&host).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            while Instant::now() < deadline {
                let mut req = hyper::Request::post(url.clone())
                    .header(hyper::header::HOST, &host)
                    .header(hyper::header::CONTENT_TYPE, "application/json");
                for (k, v) in &headers {
                    req = req.header(*k, v);
                }
                let req = req.body(Full::new(body.clone()))?;
                let t = Instant::now();
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                resp.into_body().collect().await?;
                if status == want {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    other += 1;
                }
            }
            anyhow::Ok((lat, other))
        }));
    }
    let mut all = vec![];
    let mut other = 0;
    for t in tasks {
        let (l, o) = t.await.context("load task")??;
        all.extend(l);
        other += o;
    }
    Ok((all, other))
}

pub async fn run(b: GatewayBench) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir().context("create a temporary data dir")?;
    let token = ferry_core::id::new_secret();
    let cluster = crate::up::Cluster::start(crate::up::UpConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.path().to_path_buf(),
        token: token.clone(),
        nodes: 1,
        tuning: Default::default(),
        function_env: vec![],
        cgroup: Default::default(),
    })
    .await?;
    anyhow::ensure!(
        cluster.wait_for_nodes(1, Duration::from_secs(10)).await,
        "the node agent did not attach"
    );
    let admin = ferry_sdk::client::Client::new(cluster.url.clone(), Some(token));
    // `bench`: generous limits, so every check runs and none refuses; `flood`: one call
    // per 1,000 s, so everything after the first is refused.
    let mut keys = vec![];
    for (tenant, limits) in [
        (
            "bench",
            json!({"qps": 1e9, "burst": 1_000_000_000u64, "function_qps": 1e9, "function_concurrency": 100_000}),
        ),
        ("flood", json!({"qps": 0.001, "burst": 1})),
    ] {
        admin
            .post_json("/v1/tenants", &json!({"id": tenant, "limits": limits}))
            .await
            .with_context(|| format!("create tenant {tenant}"))?;
        let k = admin
            .post_json(&format!("/v1/tenants/{tenant}/keys"), &json!({}))
            .await
            .context("create a key")?;
        keys.push(format!("Bearer {}", k["key"].as_str().unwrap_or_default()));
        let (_, pkg) = ferry_core::package::pack_dir(std::path::Path::new("functions/hello"))
            .context("package functions/hello (run from the repository root)")?;
        admin
            .deploy(&format!("{tenant}.hello"), pkg)
            .await
            .context("deploy hello")?;
    }
    admin
        .put_json(
            "/v1/functions/bench.hello/aliases/prod",
            &json!({"version": 1}),
        )
        .await
        .context("set an alias")?;
    let body = Bytes::from_static(br#"{"name":"ada"}"#);
    let url: hyper::Uri = format!("{}/v1/functions/hello:prod/invoke", cluster.url)
        .parse()
        .context("gateway URL")?;
    let plain: hyper::Uri = format!("{}/v1/functions/hello/invoke", cluster.url)
        .parse()
        .context("gateway URL")?;
    let repeat = vec![
        ("authorization", keys[0].clone()),
        ("idempotency-key", "bench-repeat".to_string()),
    ];
    let refused = vec![("authorization", keys[1].clone())];
    // The first call runs the function and stores the answer; the flood tenant spends
    // its one token.
    load(
        &url,
        &repeat,
        body.clone(),
        200,
        1,
        Duration::from_millis(500),
    )
    .await?;
    load(
        &url,
        &refused,
        body.clone(),
        429,
        4,
        Duration::from_millis(500),
    )
    .await?;

    let bare = BareHttp::start().await?;
    let bare_url: hyper::Uri = format!("http://{}/", bare.addr)
        .parse()
        .context("bare URL")?;
    let dur = Duration::from_secs(b.seconds);
    println!(
        "ferry bench gateway · {} · {} s per figure · {} callers for throughput",
        machine(),
        b.seconds,
        b.concurrency
    );

    // Own cost, one caller (nothing queues).
    let t = Instant::now();
    let (own, own_bad) = load(&url, &repeat, body.clone(), 200, 1, dur).await?;
    let own_rate = own.len() as f64 / t.elapsed().as_secs_f64();
    let (base, _) = load(&bare_url, &[], body.clone(), 200, 1, dur).await?;
    let (own, base) = (summarize(own), summarize(base));
    println!(
        "own cost (idempotent repeat: key auth, 2 token buckets, alias, idempotency lookup), 1 caller: p50 {} µs, p99 {} µs, {own_rate:.0}/s ({own_bad} unexpected) · bare HTTP p50 {} µs, p99 {} µs · gateway's own p50 ≈ {} µs ({:.1}x bare)",
        own.p50,
        own.p99,
        base.p50,
        base.p99,
        own.p50.saturating_sub(base.p50),
        own.p50 as f64 / base.p50.max(1) as f64,
    );

    // Refusals under load.
    let t = Instant::now();
    let (rej, rej_bad) = load(&plain, &refused, body.clone(), 429, b.concurrency, dur).await?;
    let rej_rate = rej.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (bare_n, _) = load(&bare_url, &[], body, 200, b.concurrency, dur).await?;
    let bare_rate = bare_n.len() as f64 / t.elapsed().as_secs_f64();
    let rej = summarize(rej);
    println!(
        "429 refusals, {} callers: {rej_rate:.0}/s, p50 {} µs ({rej_bad} unexpected) · bare HTTP {bare_rate:.0}/s · refusals/bare {:.2}x",
        b.concurrency,
        rej.p50,
        rej_rate / bare_rate.max(1.0),
    );
    bare.stop();
    cluster.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
