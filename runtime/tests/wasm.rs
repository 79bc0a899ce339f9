//! The wasm path, against real components: `hello` and the misbehaving `spin`
//! fixture. Both must be built first (see `common::artifact`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_core::ErrorCode;
use ferry_core::package::Kind;
use ferry_runtime::{Outcome, RuntimeError};

fn spin_runtime() -> (tempfile::TempDir, ferry_runtime::Runtime, String) {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (sha, bytes) = wasm_package("spin", &artifact("spin"));
    rt.prepare(&sha, &bytes).unwrap();
    (dir, rt, sha)
}

fn text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Succeeded(out) => String::from_utf8_lossy(out).into_owned(),
        other => panic!("expected success, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_greets_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (sha, bytes) = wasm_package("hello", &artifact("hello"));
    let info = rt.prepare(&sha, &bytes).unwrap();
    assert_eq!(info.kind, Kind::Wasm);
    assert_eq!(info.name, "hello");
    assert!(!info.compiled_from_disk && !info.already_prepared);
    assert!(rt.is_prepared(&sha));

    let inv = rt
        .invoke(&sha, request(br#"{"name":"ada"}"#, limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(
        inv.outcome,
        Outcome::Succeeded(br#"{"greeting":"Hello, ada!"}"#.to_vec())
    );
    assert!(
        inv.log_tail.contains("hello: greeting \"ada\""),
        "log tail: {:?}",
        inv.log_tail
    );

    let inv = rt
        .invoke(&sha, request(b"{}", limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(
        inv.outcome,
        Outcome::Succeeded(br#"{"greeting":"Hello, world!"}"#.to_vec())
    );

    // The blocking path gives the same answer.
    let inv = rt
        .invoke_wasm_blocking(&sha, &request(br#"{"name":"bob"}"#, limits(64, 5000)))
        .unwrap();
    assert_eq!(text(&inv.outcome), r#"{"greeting":"Hello, bob!"}"#);
}

#[tokio::test]
async fn a_guest_error_is_a_function_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (sha, bytes) = wasm_package("hello", &artifact("hello"));
    rt.prepare(&sha, &bytes).unwrap();
    let inv = rt
        .invoke(&sha, request(b"not json", limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(
        inv.outcome,
        Outcome::FunctionError("input must be a JSON object like {\"name\":\"ada\"}".into())
    );
    assert_eq!(inv.outcome.error_code(), Some(ErrorCode::FunctionError));
}

#[test]
fn hash_mismatch_is_refused_and_nothing_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (_, bytes) = wasm_package("hello", &artifact("hello"));
    let wrong = "0".repeat(64);
    let err = rt.prepare(&wrong, &bytes).unwrap_err();
    assert!(matches!(err, RuntimeError::HashMismatch { .. }), "{err}");
    assert!(!rt.is_prepared(&wrong));
    assert!(rt.cached_packages().is_empty());
}

#[test]
fn invalid_wasm_is_refused_with_invalid_wasm() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let cases: [(&str, &[u8], &str); 3] = [
        ("core", b"\0asm\x01\0\0\0", "core WebAssembly module"),
        (
            "garbage",
            b"this is not wasm at all",
            "not a WebAssembly binary",
        ),
        // A valid but empty component: it does not export `handle`.
        ("empty", b"\0asm\x0d\0\x01\0", "does not export `handle"),
    ];
    for (name, wasm, why) in cases {
        let (sha, bytes) = wasm_package(name, wasm);
        let err = rt.prepare(&sha, &bytes).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidWasm, "{name}: {err}");
        assert!(err.to_string().contains(why), "{name}: {err}");
        assert!(!rt.is_prepared(&sha));
    }
    // A truncated component fails compilation.
    let hello = artifact("hello");
    let (sha, bytes) = wasm_package("cut", &hello[..hello.len() / 2]);
    assert_eq!(
        rt.prepare(&sha, &bytes).unwrap_err().code(),
        ErrorCode::InvalidWasm
    );
    assert!(
        rt.cached_packages().is_empty(),
        "refused packages are not kept"
    );
}

#[tokio::test]
async fn an_endless_loop_times_out() {
    let (_dir, rt, sha) = spin_runtime();
    let start = Instant::now();
    let inv = rt
        .invoke(&sha, request(b"loop", limits(64, 200)))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::TimedOut);
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "stopped after {:?}",
        start.elapsed()
    );
    // The slot is released: the next invocation runs normally.
    let inv = rt
        .invoke(&sha, request(b"echo", limits(64, 1000)))
        .await
        .unwrap();
    assert_eq!(text(&inv.outcome), "echo");
}

#[tokio::test]
async fn a_guest_blocked_in_a_host_call_still_times_out() {
    let (_dir, rt, sha) = spin_runtime();
    let start = Instant::now();
    let inv = rt
        .invoke(&sha, request(b"sleep", limits(64, 100)))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::TimedOut);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn running_out_of_memory_is_a_function_error_about_memory() {
    let (_dir, rt, sha) = spin_runtime();
    let inv = rt
        .invoke(&sha, request(b"grow", limits(16, 5000)))
        .await
        .unwrap();
    match &inv.outcome {
        Outcome::FunctionError(msg) => assert!(
            msg.contains("memory limit exceeded") && msg.contains("16 MiB"),
            "{msg}"
        ),
        other => panic!("expected a memory error, got {other:?}"),
    }
    // The pool's ceiling (max_wasm_memory_mb = 128) holds even when limits ask for more.
    let inv = rt
        .invoke(&sha, request(b"grow", limits(4096, 10_000)))
        .await
        .unwrap();
    match &inv.outcome {
        Outcome::FunctionError(msg) => assert!(msg.contains("memory limit exceeded"), "{msg}"),
        other => panic!("expected a memory error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_panic_is_a_trap_with_the_panic_message() {
    let (_dir, rt, sha) = spin_runtime();
    let inv = rt
        .invoke(&sha, request(b"panic", limits(64, 5000)))
        .await
        .unwrap();
    match &inv.outcome {
        Outcome::FunctionError(msg) => assert!(msg.starts_with("trap: "), "{msg}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(
        inv.log_tail.contains("spin was asked to panic"),
        "{}",
        inv.log_tail
    );
}

#[tokio::test]
async fn the_sandbox_has_only_ferry_env_no_files_no_network() {
    let (_dir, rt, sha) = spin_runtime();
    let mut req = request(b"env", limits(64, 5000));
    req.request_id = "req-42".into();
    let env = text(&rt.invoke(&sha, req).await.unwrap().outcome);
    let mut vars: Vec<&str> = env.lines().collect();
    vars.sort();
    assert_eq!(
        vars,
        [
            "FERRY_FUNCTION=test-fn",
            "FERRY_REQUEST_ID=req-42",
            "FERRY_VERSION=7"
        ]
    );

    let inv = rt
        .invoke(&sha, request(b"fs", limits(64, 5000)))
        .await
        .unwrap();
    assert!(
        matches!(&inv.outcome, Outcome::FunctionError(m) if m.starts_with("fs: ")),
        "{:?}",
        inv.outcome
    );
    let inv = rt
        .invoke(&sha, request(b"net", limits(64, 5000)))
        .await
        .unwrap();
    assert!(
        matches!(&inv.outcome, Outcome::FunctionError(m) if m.starts_with("net: ")),
        "{:?}",
        inv.outcome
    );
}

#[tokio::test]
async fn output_and_logs_are_capped() {
    let (_dir, rt, sha) = spin_runtime();
    // max_output_bytes is 1 MiB in these tests.
    let inv = rt
        .invoke(&sha, request(b"big:1000", limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::Succeeded(vec![b'x'; 1000]));
    let inv = rt
        .invoke(
            &sha,
            request(
                format!("big:{}", (1 << 20) + 1).as_bytes(),
                limits(64, 5000),
            ),
        )
        .await
        .unwrap();
    assert!(
        matches!(&inv.outcome, Outcome::Failed(m) if m.contains("output larger than")),
        "{:?}",
        inv.outcome
    );
    // A chatty guest is not stopped; only the end of its log is kept.
    let inv = rt
        .invoke(&sha, request(b"log:20000", limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(text(&inv.outcome), "logged");
    assert!(inv.log_tail.len() <= 1024, "{}", inv.log_tail.len());
    assert!(
        inv.log_tail.ends_with("log line 19999\n"),
        "{:?}",
        inv.log_tail
    );
}

#[tokio::test]
async fn prepare_is_idempotent_and_concurrent_prepares_agree() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (sha, bytes) = wasm_package("hello", &artifact("hello"));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (rt, sha, bytes) = (rt.clone(), sha.clone(), bytes.clone());
            std::thread::spawn(move || rt.prepare(&sha, &bytes).unwrap())
        })
        .collect();
    let infos: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        infos.iter().filter(|i| !i.already_prepared).count(),
        1,
        "compiled once: {infos:?}"
    );
    assert!(rt.prepare(&sha, &bytes).unwrap().already_prepared);
    assert_eq!(rt.cached_packages(), vec![sha.clone()]);
    let compiled: Vec<_> = std::fs::read_dir(dir.path().join("compiled"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(
        compiled.len(),
        1,
        "one artifact, no temporary files left: {compiled:?}"
    );
}

#[tokio::test]
async fn after_a_restart_the_disk_cache_is_enough() {
    let dir = tempfile::tempdir().unwrap();
    let (sha, bytes) = wasm_package("hello", &artifact("hello"));
    {
        let rt = runtime(dir.path());
        rt.prepare(&sha, &bytes).unwrap();
    }
    let rt = runtime(dir.path());
    assert!(!rt.is_prepared(&sha));
    let err = rt
        .invoke(&sha, request(b"{}", limits(64, 5000)))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NotPrepared(_)), "{err}");
    assert_eq!(err.code(), ErrorCode::PackageNotFound);
    assert_eq!(rt.cached_packages(), vec![sha.clone()]);
    assert!(rt.prepare_from_disk(&sha).unwrap());
    assert!(rt.is_prepared(&sha));
    let inv = rt
        .invoke(&sha, request(br#"{"name":"disk"}"#, limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(text(&inv.outcome), r#"{"greeting":"Hello, disk!"}"#);
    // A fresh runtime given the bytes again loads the compiled artifact instead of compiling.
    let rt = runtime(dir.path());
    assert!(rt.prepare(&sha, &bytes).unwrap().compiled_from_disk);
    // Unknown packages are simply not there.
    assert!(!rt.prepare_from_disk(&"a".repeat(64)).unwrap());
    assert!(!rt.prepare_from_disk("../../etc/passwd").unwrap());
}

#[tokio::test]
async fn many_concurrent_invocations() {
    let (_dir, rt, sha) = spin_runtime();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (rt, sha) = (rt.clone(), sha.clone());
            tokio::spawn(async move {
                rt.invoke(&sha, request(format!("n{i}").as_bytes(), limits(64, 5000)))
                    .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let inv = t.await.unwrap().unwrap();
        assert_eq!(text(&inv.outcome), format!("n{i}"));
    }
}

#[tokio::test]
async fn the_hello_example_packs_from_its_folder_and_runs() {
    let (manifest, bytes) =
        ferry_core::package::pack_dir(&workspace_root().join("functions/hello")).unwrap();
    assert_eq!(
        (manifest.name.as_str(), manifest.kind),
        ("hello", Kind::Wasm)
    );
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let sha = ferry_core::id::sha256_hex(&bytes);
    rt.prepare(&sha, &bytes).unwrap();
    let inv = rt
        .invoke(&sha, request(br#"{"name":"ada"}"#, manifest.limits))
        .await
        .unwrap();
    assert_eq!(text(&inv.outcome), r#"{"greeting":"Hello, ada!"}"#);
}
