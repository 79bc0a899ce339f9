//! Helpers shared by the runtime's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use ferry_core::package::{Limits, PackFile};
use ferry_runtime::{Config, Request, Runtime};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A guest built ahead of the tests (building wasm inside tests is slow and fragile).
pub fn artifact(name: &str) -> Vec<u8> {
    let path = workspace_root()
        .join("target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    let build = match name {
        "hello" => "cargo build -p hello --target wasm32-wasip2 --release".to_string(),
        _ => format!(
            "cargo build --release --target wasm32-wasip2 --manifest-path runtime/tests/fixtures/{name}/Cargo.toml --target-dir target"
        ),
    };
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}): run `{build}` in the workspace root before the runtime tests",
            path.display()
        )
    })
}

pub fn runtime(cache: &Path) -> Runtime {
    Runtime::new(Config {
        cache_dir: cache.to_path_buf(),
        max_instances: 8,
        max_wasm_memory_mb: 128,
        log_tail_bytes: 1024,
        max_output_bytes: 1 << 20,
        // Deterministic on every host: the rlimit path (cgroups have their own test).
        cgroup: ferry_runtime::cgroup::CgroupSetting::Off,
        ..Config::default()
    })
    .unwrap()
}

pub fn file(path: &str, bytes: &[u8], executable: bool) -> PackFile {
    PackFile {
        path: path.into(),
        bytes: bytes.to_vec(),
        executable,
    }
}

/// A wasm package around a component; returns (sha, bytes).
pub fn wasm_package(name: &str, wasm: &[u8]) -> (String, Vec<u8>) {
    let manifest = format!("name = \"{name}\"\nkind = \"wasm\"\nmodule = \"{name}.wasm\"\n");
    package(vec![
        file("ferry.toml", manifest.as_bytes(), false),
        file(&format!("{name}.wasm"), wasm, false),
    ])
}

/// A native package whose entrypoint is the shell script `script`.
pub fn native_package(script: &str) -> (String, Vec<u8>) {
    let manifest = "name = \"script\"\nkind = \"native\"\nentrypoint = [\"bin/run.sh\"]\n";
    package(vec![
        file("ferry.toml", manifest.as_bytes(), false),
        file("bin/run.sh", script.as_bytes(), true),
    ])
}

pub fn package(files: Vec<PackFile>) -> (String, Vec<u8>) {
    let bytes = ferry_core::package::build(files).unwrap();
    (ferry_core::id::sha256_hex(&bytes), bytes)
}

pub fn request(input: &[u8], limits: Limits) -> Request {
    Request {
        input: input.to_vec(),
        limits,
        function: "test-fn".into(),
        version: 7,
        request_id: format!("req-{}", ferry_core::id::new_id()),
        progress: None,
        env: vec![],
    }
}

pub fn limits(memory_mb: u64, timeout_ms: u64) -> Limits {
    Limits {
        memory_mb,
        timeout_ms,
        cpu_millis: 100,
    }
}
