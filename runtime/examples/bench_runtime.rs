//! Measures the wasm invocation path and package preparation.
//!
//! ```text
//! cargo build -p hello --target wasm32-wasip2 --release
//! cargo run --release -p ferry-runtime --example bench_runtime -- [hello.wasm | package.tar.gz] [iterations]
//! ```
//!
//! Prints: cold prepare (compile) vs prepare from the disk cache after a restart, then
//! per-invocation latency (instantiate from the pre-instantiated template + call
//! `handle` + drop) of `invoke_wasm_blocking`, and of the async `invoke` for comparison.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_core::package::{Limits, PackFile};
use ferry_runtime::{Config, Outcome, Request, Runtime};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release/hello.wasm")
    });
    let iterations: usize = args
        .next()
        .map(|n| n.parse().expect("iterations"))
        .unwrap_or(20_000);
    let file = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let package = if file.starts_with(b"\0asm") {
        ferry_core::package::build(vec![
            PackFile {
                path: "ferry.toml".into(),
                bytes: b"name = \"hello\"\nkind = \"wasm\"\nmodule = \"hello.wasm\"\n".to_vec(),
                executable: false,
            },
            PackFile {
                path: "hello.wasm".into(),
                bytes: file,
                executable: false,
            },
        ])
        .unwrap()
    } else {
        file
    };
    let sha = ferry_core::id::sha256_hex(&package);
    let cache = tempfile::tempdir().unwrap();
    let config = Config {
        cache_dir: cache.path().to_path_buf(),
        ..Config::default()
    };

    let rt = Runtime::new(config.clone()).unwrap();
    let start = Instant::now();
    let info = rt.prepare(&sha, &package).unwrap();
    let cold = start.elapsed();
    assert!(!info.compiled_from_disk);
    drop(rt);
    let rt = Runtime::new(config).unwrap();
    let start = Instant::now();
    assert!(rt.prepare_from_disk(&sha).unwrap());
    let warm = start.elapsed();
    println!(
        "package: {} ({} bytes, sha {})",
        path.display(),
        package.len(),
        &sha[..12]
    );
    println!(
        "prepare, cold (verify + unpack + compile + cache): {:>9.2} ms",
        ms(cold)
    );
    println!(
        "prepare_from_disk after restart (load .cwasm):     {:>9.2} ms",
        ms(warm)
    );

    let req = Request {
        input: br#"{"name":"ada"}"#.to_vec(),
        limits: Limits {
            memory_mb: 64,
            timeout_ms: 5000,
            cpu_millis: 50,
        },
        function: "hello".into(),
        version: 1,
        request_id: "bench".into(),
        progress: None,
        env: vec![],
    };
    let check = rt.invoke_wasm_blocking(&sha, &req).unwrap();
    assert!(
        matches!(check.outcome, Outcome::Succeeded(_)),
        "{:?} {}",
        check.outcome,
        check.log_tail
    );

    for _ in 0..iterations / 10 {
        rt.invoke_wasm_blocking(&sha, &req).unwrap();
    }
    let mut samples = Vec::with_capacity(iterations);
    let all = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        let inv = rt.invoke_wasm_blocking(&sha, &req).unwrap();
        samples.push(t.elapsed());
        std::hint::black_box(inv);
    }
    let total = all.elapsed();
    report("invoke_wasm_blocking", &mut samples, total);

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let n = (iterations / 4).max(1);
    let mut samples = Vec::with_capacity(n);
    let all = Instant::now();
    tokio.block_on(async {
        for _ in 0..n {
            let t = Instant::now();
            let inv = rt.invoke(&sha, req.clone()).await.unwrap();
            samples.push(t.elapsed());
            std::hint::black_box(inv);
        }
    });
    let total = all.elapsed();
    report("invoke (async, spawn_blocking)", &mut samples, total);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(what: &str, samples: &mut [Duration], total: Duration) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{what}: {} calls, p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, max {:.1} µs, {:.0} calls/s on one thread",
        samples.len(),
        us(pick(0.50)),
        us(pick(0.99)),
        us(mean),
        us(samples[samples.len() - 1]),
        samples.len() as f64 / total.as_secs_f64()
    );
}
