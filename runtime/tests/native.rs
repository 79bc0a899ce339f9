//! The native path: processes, their groups, scratch directories and limits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_core::ErrorCode;
use ferry_core::package::Kind;
use ferry_runtime::{Outcome, RuntimeError};

fn prepared(script: &str) -> (tempfile::TempDir, ferry_runtime::Runtime, String) {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (sha, bytes) = native_package(script);
    let info = rt.prepare(&sha, &bytes).unwrap();
    assert_eq!(info.kind, Kind::Native);
    (dir, rt, sha)
}

fn scratch_entries(dir: &tempfile::TempDir) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.path().join("scratch"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Whether a process is gone (reaped, or a zombie nobody reaped yet).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("");
            state == "Z" || state == "X"
        }
    }
}

#[tokio::test]
async fn the_checksum_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let (manifest, bytes) =
        ferry_core::package::pack_dir(&workspace_root().join("functions/checksum")).unwrap();
    assert_eq!(manifest.kind, Kind::Native);
    let sha = ferry_core::id::sha256_hex(&bytes);
    rt.prepare(&sha, &bytes).unwrap();
    let input = vec![b'a'; 200_000]; // more than a pipe buffer: stdin and stdout must flow together
    let inv = rt
        .invoke(&sha, request(&input, manifest.limits))
        .await
        .unwrap();
    let expected = format!(
        "{{\"bytes\":200000,\"sha256\":\"{}\"}}\n",
        ferry_core::id::sha256_hex(&input)
    );
    assert_eq!(
        inv.outcome,
        Outcome::Succeeded(expected.into_bytes()),
        "log: {}",
        inv.log_tail
    );
    assert!(
        inv.log_tail.contains("checksum: 200000 bytes"),
        "{}",
        inv.log_tail
    );
    assert!(
        scratch_entries(&dir).is_empty(),
        "scratch directory left behind"
    );
}

#[tokio::test]
async fn a_large_output_streams_while_input_is_written() {
    // `cat` echoes as it reads: neither side may wait for the other to finish.
    let (_dir, rt, sha) = prepared("#!/bin/sh\ncat\n");
    let input: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let inv = rt
        .invoke(&sha, request(&input, limits(64, 10_000)))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::Succeeded(input));
}

#[tokio::test]
async fn a_non_zero_exit_is_a_function_error_with_stderr() {
    let (dir, rt, sha) =
        prepared("#!/bin/sh\necho 'first line' >&2\necho 'bad input: no frames' >&2\nexit 3\n");
    let inv = rt
        .invoke(&sha, request(b"x", limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(
        inv.outcome,
        Outcome::FunctionError("exit status 3: bad input: no frames".into())
    );
    assert!(inv.log_tail.contains("first line"));
    assert!(scratch_entries(&dir).is_empty());
}

#[tokio::test]
async fn a_timeout_kills_the_whole_group_and_removes_the_scratch_dir() {
    let script =
        "#!/bin/sh\nsleep 100 &\necho \"bg $!\" >&2\necho work > \"$HOME/file\"\nsleep 100\n";
    let (dir, rt, sha) = prepared(script);
    let start = Instant::now();
    let inv = rt
        .invoke(&sha, request(b"", limits(64, 500)))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::TimedOut);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let pid: u32 = inv
        .log_tail
        .lines()
        .find_map(|l| l.strip_prefix("bg "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no grandchild pid in {:?}", inv.log_tail));
    let deadline = Instant::now() + Duration::from_secs(2);
    while !is_dead(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        is_dead(pid),
        "background grandchild {pid} survived the timeout"
    );
    assert!(
        scratch_entries(&dir).is_empty(),
        "scratch directory left behind"
    );
}

#[tokio::test]
async fn leftover_background_processes_are_killed_when_the_entrypoint_exits() {
    let (_dir, rt, sha) = prepared("#!/bin/sh\nsleep 100 &\necho \"$!\"\n");
    let start = Instant::now();
    let inv = rt
        .invoke(&sha, request(b"", limits(64, 5000)))
        .await
        .unwrap();
    let Outcome::Succeeded(out) = &inv.outcome else {
        panic!("{:?}", inv.outcome)
    };
    // It returns at once, although the background `sleep` holds stdout open.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let pid: u32 = String::from_utf8_lossy(out).trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !is_dead(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        is_dead(pid),
        "background process {pid} outlived its invocation"
    );
}

#[tokio::test]
async fn the_process_runs_in_its_scratch_dir_with_a_clean_environment() {
    let (dir, rt, sha) = prepared("#!/bin/sh\npwd\nenv | sort\n");
    let mut req = request(b"", limits(64, 5000));
    req.request_id = "req-9".into();
    let inv = rt.invoke(&sha, req).await.unwrap();
    let Outcome::Succeeded(out) = &inv.outcome else {
        panic!("{:?}", inv.outcome)
    };
    let out = String::from_utf8_lossy(out);
    let mut lines = out.lines();
    let cwd = lines.next().unwrap();
    let scratch = std::fs::canonicalize(dir.path()).unwrap().join("scratch");
    assert!(
        cwd.starts_with(scratch.to_str().unwrap()) && cwd.contains("req-9-"),
        "cwd {cwd}"
    );
    let vars: Vec<&str> = lines.collect();
    let names: Vec<&str> = vars.iter().filter_map(|v| v.split('=').next()).collect();
    for name in &names {
        // PWD is the shell's own.
        assert!(
            [
                "FERRY_FUNCTION",
                "FERRY_REQUEST_ID",
                "FERRY_VERSION",
                "HOME",
                "LANG",
                "PATH",
                "PWD",
                "TMPDIR"
            ]
            .contains(name),
            "unexpected variable {name} in {vars:?}"
        );
    }
    assert!(vars.contains(&"PATH=/usr/local/bin:/usr/bin:/bin"));
    assert!(
        vars.contains(&"FERRY_FUNCTION=test-fn")
            && vars.contains(&"FERRY_VERSION=7")
            && vars.contains(&"FERRY_REQUEST_ID=req-9")
    );
    assert!(
        vars.contains(&format!("HOME={cwd}").as_str())
            && vars.contains(&format!("TMPDIR={cwd}").as_str())
    );
    // The test process's own environment (cargo sets CARGO_MANIFEST_DIR) does not leak.
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    assert!(!out.contains("CARGO"), "{out}");
    assert!(scratch_entries(&dir).is_empty());
}

#[tokio::test]
async fn too_much_output_fails_and_kills_the_process() {
    let (_dir, rt, sha) = prepared("#!/bin/sh\nexec yes\n");
    let start = Instant::now();
    let inv = rt
        .invoke(&sha, request(b"", limits(64, 10_000)))
        .await
        .unwrap();
    assert_eq!(
        inv.outcome,
        Outcome::Failed("output larger than 1048576 bytes".into())
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn the_address_space_limit_applies() {
    // dd allocates its whole block: 200 MiB does not fit in 64 MiB of address space
    // but does with 512 MiB; 16 MiB (the floor) is plenty for `sh` itself.
    let script = "#!/bin/sh\nulimit -v\ndd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null && echo allocated || echo refused\n";
    let (_dir, rt, sha) = prepared(script);
    let run = |memory_mb| {
        let rt = rt.clone();
        let sha = sha.clone();
        async move {
            let inv = rt
                .invoke(&sha, request(b"", limits(memory_mb, 20_000)))
                .await
                .unwrap();
            let Outcome::Succeeded(out) = &inv.outcome else {
                panic!("{:?} {}", inv.outcome, inv.log_tail)
            };
            String::from_utf8_lossy(out).into_owned()
        }
    };
    assert_eq!(run(64).await, "65536\nrefused\n", "RLIMIT_AS is in KiB");
    assert_eq!(run(512).await, "524288\nallocated\n");
    // Tiny limits are raised to the floor rather than breaking the shell.
    assert_eq!(run(1).await, "16384\nrefused\n");
}

#[test]
fn unsafe_and_broken_packages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    // A tar entry climbing out with `../`, built by hand as an attacker would.
    let mut raw = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut raw, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        for (name, body) in [
            (
                &b"ferry.toml"[..],
                &b"name = \"evil\"\nkind = \"native\"\nentrypoint = [\"run.sh\"]\n"[..],
            ),
            (b"run.sh", b"#!/bin/sh\n"),
            (b"../escape.sh", b"#!/bin/sh\n"),
        ] {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            t.append(&h, body).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap();
    }
    let sha = ferry_core::id::sha256_hex(&raw);
    let err = rt.prepare(&sha, &raw).unwrap_err();
    assert_eq!(err.code(), ErrorCode::UnsafeArchive, "{err}");
    assert!(matches!(err, RuntimeError::Package(_)));
    assert!(
        !dir.path().join("escape.sh").exists() && !dir.path().join("unpacked/escape.sh").exists()
    );
    assert!(
        rt.cached_packages().is_empty(),
        "a refused package is not kept"
    );

    // An entrypoint without the executable bit.
    let (sha, bytes) = package(vec![
        file(
            "ferry.toml",
            b"name = \"noexec\"\nkind = \"native\"\nentrypoint = [\"run.sh\"]\n",
            false,
        ),
        file("run.sh", b"#!/bin/sh\n", false),
    ]);
    let err = rt.prepare(&sha, &bytes).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidPackage);
    assert!(err.to_string().contains("executable"), "{err}");
    assert!(
        std::fs::read_dir(dir.path().join("unpacked"))
            .unwrap()
            .next()
            .is_none(),
        "nothing left unpacked"
    );
    assert!(rt.cached_packages().is_empty());
}

#[tokio::test]
async fn after_a_restart_the_disk_cache_is_enough() {
    let dir = tempfile::tempdir().unwrap();
    let (sha, bytes) = native_package("#!/bin/sh\nprintf 'from disk'\n");
    runtime(dir.path()).prepare(&sha, &bytes).unwrap();
    let rt = runtime(dir.path());
    assert!(!rt.is_prepared(&sha));
    assert!(rt.prepare_from_disk(&sha).unwrap());
    let inv = rt
        .invoke(&sha, request(b"", limits(64, 5000)))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::Succeeded(b"from disk".to_vec()));
    // A damaged cached package is dropped, not run.
    let rt = runtime(dir.path());
    std::fs::write(
        dir.path().join("packages").join(format!("{sha}.tar.gz")),
        b"tampered",
    )
    .unwrap();
    assert!(!rt.prepare_from_disk(&sha).unwrap());
    assert!(rt.cached_packages().is_empty());
}

#[tokio::test]
async fn an_abandoned_invocation_still_cleans_up() {
    // The background `sleep` is not the process tokio kills when the future is dropped.
    let (dir, rt, sha) =
        prepared("#!/bin/sh\nsleep 100 &\necho \"$!\" > \"$HOME/../../pid\"\nwait\n");
    let fut = rt.invoke(&sha, request(b"", limits(64, 60_000)));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), fut)
            .await
            .is_err()
    );
    let pid: u32 = std::fs::read_to_string(dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !is_dead(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        is_dead(pid),
        "process {pid} survived its abandoned invocation"
    );
    assert!(scratch_entries(&dir).is_empty());
}

#[tokio::test]
async fn progress_lines_arrive_while_the_process_runs_and_stay_out_of_the_log() {
    // The script reports 50%, then waits for the test to create a file (so the report
    // must have arrived while it still ran), then reports 100% and ends.
    let script = "#!/bin/sh\n\
        go=$(cat)\n\
        echo 'starting' >&2\n\
        echo 'ferry-progress: 50.5 fps=118.3 speed=3.9x' >&2\n\
        i=0\n\
        while [ ! -e \"$go\" ]; do i=$((i+1)); [ $i -gt 3000 ] && exit 9; sleep 0.01; done\n\
        echo 'ferry-progress: not-a-number' >&2\n\
        echo 'ferry-progress: 100 done' >&2\n\
        echo 'finished' >&2\n\
        echo ok\n";
    let (dir, rt, sha) = prepared(script);
    let go = dir.path().join("go");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut req = request(go.display().to_string().as_bytes(), limits(64, 60_000));
    req.progress = Some(tx);
    let running = tokio::spawn({
        let rt = rt.clone();
        async move { rt.invoke(&sha, req).await }
    });
    let first = rx.recv().await.expect("a progress report while running");
    assert_eq!(first.percent, 50.5);
    assert_eq!(first.message, "fps=118.3 speed=3.9x");
    assert!(!running.is_finished(), "the report came before the end");
    std::fs::write(&go, b"").unwrap();
    let inv = running.await.unwrap().unwrap();
    assert_eq!(inv.outcome, Outcome::Succeeded(b"ok\n".to_vec()));
    let last = rx.recv().await.expect("the final report");
    assert_eq!((last.percent, last.message.as_str()), (100.0, "done"));
    assert!(
        rx.recv().await.is_none(),
        "nothing else, and the sender is dropped"
    );
    assert_eq!(
        inv.log_tail, "starting\nferry-progress: not-a-number\nfinished\n",
        "progress lines are not in the log tail; malformed ones are"
    );
}

#[tokio::test]
async fn with_a_cgroup_root_each_invocation_gets_its_own_cgroup_with_the_limits() {
    // A stand-in cgroup directory (this host has no cgroup v2 controllers to delegate):
    // plain files, so the test sees what the runtime writes where the kernel would read.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cg");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
    std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
    let rt = ferry_runtime::Runtime::new(ferry_runtime::Config {
        cache_dir: dir.path().join("cache"),
        cgroup: ferry_runtime::cgroup::CgroupSetting::Root(root.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        rt.native_limits(),
        &ferry_runtime::cgroup::Limiter::Cgroup { root: root.clone() }
    );
    let script = "#!/bin/sh\nroot=$(cat)\nd=$(ls -d \"$root\"/ferry-*)\n\
        echo \"pid=$$ procs=$(cat \"$d/cgroup.procs\") cpu=$(cat \"$d/cpu.max\") mem=$(cat \"$d/memory.max\") as=$(ulimit -v)\"\n";
    let (sha, bytes) = native_package(script);
    rt.prepare(&sha, &bytes).unwrap();
    let mut l = limits(96, 10_000);
    l.cpu_millis = 1500;
    let inv = rt
        .invoke(&sha, request(root.display().to_string().as_bytes(), l))
        .await
        .unwrap();
    let Outcome::Succeeded(out) = &inv.outcome else {
        panic!("{:?} {}", inv.outcome, inv.log_tail);
    };
    let out = String::from_utf8_lossy(out);
    let field = |k: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} in {out}"))
            .to_string()
    };
    assert_eq!(
        field("procs"),
        field("pid"),
        "the process joined before exec: {out}"
    );
    assert_eq!(field("cpu"), "150000", "1.5 CPUs of each 100 ms: {out}");
    assert!(out.contains("cpu=150000 100000"), "{out}");
    assert_eq!(field("mem"), (96u64 << 20).to_string());
    assert_eq!(field("as"), "unlimited", "no RLIMIT_AS under a cgroup");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ferry-"))
        .collect();
    assert!(left.is_empty(), "the invocation's cgroup is removed");
}

#[tokio::test]
async fn a_flood_of_stderr_keeps_only_a_capped_tail() {
    // 4 MB of log lines and progress reports: the runtime keeps the last
    // `log_tail_bytes` (1024 in these tests) and memory stays bounded.
    let script = "#!/bin/sh\n\
        yes 'a log line that repeats' | head -n 100000 >&2\n\
        yes 'ferry-progress: 50 x' | head -n 50000 >&2\n\
        echo 'the end' >&2\n\
        echo ok\n";
    let (dir, rt, sha) = prepared(script);
    let inv = rt
        .invoke(&sha, request(b"", limits(64, 30_000)))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::Succeeded(b"ok\n".to_vec()));
    assert!(inv.log_tail.len() <= 1024, "{}", inv.log_tail.len());
    assert!(inv.log_tail.ends_with("a log line that repeats\nthe end\n"));
    assert!(!inv.log_tail.contains("ferry-progress"));
    assert!(scratch_entries(&dir).is_empty());
}
