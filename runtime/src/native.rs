//! Native packages: a program run as a process per invocation.
//!
//! The package is unpacked (safely: no links, no `..`, no absolute paths) into
//! `unpacked/<sha>/`. Each invocation runs its `entrypoint`:
//!
//! * **cwd**: a fresh scratch directory `scratch/<request-id>-<random>/`, removed
//!   afterwards (also on timeout or when the invocation is abandoned). `HOME` and
//!   `TMPDIR` point at it.
//! * **environment**: cleared, then only `PATH=/usr/local/bin:/usr/bin:/bin`, `HOME`,
//!   `TMPDIR`, `LANG=C.UTF-8`, `FERRY_FUNCTION`, `FERRY_VERSION`, `FERRY_REQUEST_ID`,
//!   plus the request's extra variables ([`Request::env`], e.g. the operator's API
//!   address and credential), which cannot replace those.
//! * **I/O**: the input is written to stdin (concurrently with reading stdout, then
//!   closed); stdout is the output, at most `max_output_bytes` (more: the process
//!   group is killed and the outcome is `Failed`); the last `log_tail_bytes` of stderr
//!   are the log tail, except progress lines (`ferry-progress: <percent> <text>`),
//!   which are parsed as they arrive and sent to [`Request::progress`] (see
//!   [`crate::progress`]).
//! * **processes**: the entrypoint leads its own process group. On timeout the whole
//!   group gets SIGKILL (background children included) and the outcome is `TimedOut`;
//!   when the entrypoint exits, whatever it left running in its group is killed too.
//!   A process that leaves the group (`setsid`) escapes this unless cgroups are in
//!   force.
//! * **CPU and memory** (see [`crate::cgroup`]): where the host delegates a cgroup v2
//!   subtree, each invocation runs in its own cgroup with `cpu.max` from
//!   `limits.cpu_millis` and `memory.max` from `limits.memory_mb` (all its processes,
//!   page cache included; a kill by it reads "killed by the memory limit"); the process
//!   joins it before `exec`, and whatever is left in it is killed at the end, `setsid`
//!   or not. Otherwise `RLIMIT_AS` (address space, per process) is set to
//!   `limits.memory_mb` MiB, but never below [`MIN_ADDRESS_SPACE_MB`] since the
//!   dynamic loader alone needs a few MiB, and the CPU is not limited. Address space is
//!   not resident memory: programs that reserve large virtual ranges (JVMs, Go, some
//!   allocators) need a higher limit than they use.
//! * exit status 0 → `Succeeded(stdout)`; otherwise `FunctionError("exit status N:
//!   <last stderr line>")` (or "killed by signal N").

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_core::{Error, ErrorCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::cgroup::{InvocationGroup, Limiter};
use crate::progress::Splitter;
use crate::tail::{Tail, last_line};
use crate::{Config, Invocation, Outcome, Request, RuntimeError};

/// The `PATH` a native function sees.
pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The lowest `RLIMIT_AS` set, whatever `limits.memory_mb` says: below about 4 MiB not
/// even `sh` and coreutils can map libc.
pub const MIN_ADDRESS_SPACE_MB: u64 = 16;

/// A prepared native function.
#[derive(Clone, Debug)]
pub(crate) struct NativeFunction {
    program: PathBuf,
    args: Vec<String>,
}

fn invalid(msg: String) -> RuntimeError {
    RuntimeError::Package(Error::new(ErrorCode::InvalidPackage, msg))
}

impl NativeFunction {
    /// Unpacks the package into `dir` unless it is there already, and checks the
    /// entrypoint is an executable file.
    pub(crate) fn prepare(
        bytes: &[u8],
        dir: &Path,
        entrypoint: &[String],
        max_unpacked: u64,
    ) -> Result<Self, RuntimeError> {
        if !dir.exists() {
            ferry_core::package::unpack(bytes, dir, max_unpacked).map_err(RuntimeError::Package)?;
        }
        let found = Self::find(dir, entrypoint);
        if found.is_err() {
            let _ = std::fs::remove_dir_all(dir);
        }
        found
    }

    fn find(dir: &Path, entrypoint: &[String]) -> Result<Self, RuntimeError> {
        let first = entrypoint.first().map(String::as_str).unwrap_or_default();
        let rel = ferry_core::package::safe_path(first).ok_or_else(|| {
            invalid(format!(
                "entrypoint {first:?} must be a relative path inside the package"
            ))
        })?;
        let program = dir.join(rel);
        let meta = std::fs::metadata(&program)
            .map_err(|e| invalid(format!("entrypoint {first:?} is not in the package: {e}")))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(invalid(format!(
                "entrypoint {first:?} is not an executable file (chmod +x it before packing)"
            )));
        }
        Ok(Self {
            program,
            args: entrypoint[1..].to_vec(),
        })
    }
}

/// Sends SIGKILL to a whole process group.
#[allow(unsafe_code)]
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; the negative pid addresses
    // only the process group the runtime created for this invocation.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Kills the group when dropped: also when the invocation future is abandoned.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// A scratch directory, removed by [`Scratch::remove`] or, failing that, when dropped.
struct Scratch(Option<PathBuf>);

impl Scratch {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// Removes the directory off the async threads (it may hold large files).
    async fn remove(mut self) {
        if let Some(dir) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || remove_dir(&dir)).await;
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            remove_dir(&dir);
        }
    }
}

fn remove_dir(dir: &Path) {
    // A killed process may still be on its way out; try twice.
    if std::fs::remove_dir_all(dir).is_err() && dir.exists() {
        std::thread::sleep(Duration::from_millis(10));
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), "could not remove scratch directory: {e}");
        }
    }
}

/// An invocation's cgroup, removed by [`Cgroup::remove`] or, failing that, when dropped
/// (also when the invocation is abandoned).
struct Cgroup(Option<InvocationGroup>);

impl Cgroup {
    /// Kills what is left in it and removes it, off the async threads.
    async fn remove(mut self) {
        if let Some(g) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || g.remove()).await;
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.remove();
        }
    }
}

/// The variables the runtime sets itself: an extra variable cannot replace them.
pub const RESERVED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "FERRY_FUNCTION",
    "FERRY_VERSION",
    "FERRY_REQUEST_ID",
];

/// Whether an extra variable is set: a valid name (`[A-Za-z_][A-Za-z0-9_]*`), not
/// reserved, no NUL in the value.
fn extra_env_allowed(name: &str, value: &str) -> bool {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid && !RESERVED_ENV.contains(&name) && !value.contains('\0')
}

/// A directory name from a request id: its safe characters, plus randomness so
/// concurrent invocations never share one.
fn scratch_name(request_id: &str) -> String {
    let safe: String = request_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    if safe.is_empty() {
        ferry_core::id::new_id()
    } else {
        format!("{safe}-{}", ferry_core::id::new_id())
    }
}

#[allow(unsafe_code)]
fn limit_address_space(cmd: &mut Command, memory_mb: u64) {
    let bytes = memory_mb.max(MIN_ADDRESS_SPACE_MB).saturating_mul(1 << 20) as libc::rlim_t;
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: the closure runs in the forked child before exec; it only calls
    // setrlimit(2), which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads a stream to its end; past `cap` bytes, kills the group and stops.
async fn read_capped(mut r: impl AsyncRead + Unpin, cap: usize, pgid: u32) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return (out, false),
            Ok(n) if out.len() + n > cap => {
                kill_group(pgid);
                return (out, true);
            }
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads stderr to its end: progress lines to the channel, the rest to the tail.
async fn read_stderr(mut r: impl AsyncRead + Unpin, tail: &Mutex<Tail>, mut split: Splitter) {
    let mut chunk = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
        split.push(&chunk[..n], &mut t, Instant::now());
    }
    let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
    split.finish(&mut t, Instant::now());
}

/// Runs one invocation of a native function. Never fails: problems are outcomes.
pub(crate) async fn invoke(
    f: &NativeFunction,
    req: &Request,
    cfg: &Config,
    limiter: &Limiter,
) -> Invocation {
    let start = Instant::now();
    let done = |outcome, log_tail| Invocation {
        outcome,
        log_tail,
        duration: start.elapsed(),
    };
    let name = scratch_name(&req.request_id);
    let scratch = Scratch(Some(cfg.cache_dir.join("scratch").join(&name)));
    if let Err(e) = std::fs::create_dir_all(scratch.path()) {
        return done(
            Outcome::Failed(format!("create scratch directory: {e}")),
            String::new(),
        );
    }
    let mut cmd = Command::new(&f.program);
    cmd.args(&f.args)
        .current_dir(scratch.path())
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", scratch.path())
        .env("TMPDIR", scratch.path())
        .env("LANG", "C.UTF-8")
        .env("FERRY_FUNCTION", &req.function)
        .env("FERRY_VERSION", req.version.to_string())
        .env("FERRY_REQUEST_ID", &req.request_id)
        .envs(
            req.env
                .iter()
                .filter(|(k, v)| extra_env_allowed(k, v))
                .map(|(k, v)| (k, v)),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let group = match limiter {
        Limiter::Cgroup { root } => {
            let (root, name) = (root.clone(), name.clone());
            let (cpu, mem) = (req.limits.cpu_millis, req.limits.memory_mb);
            let made = tokio::task::spawn_blocking(move || {
                InvocationGroup::create(&root, &name, cpu, mem)
            })
            .await;
            match made {
                Ok(Ok(g)) => Some(Cgroup(Some(g))),
                Ok(Err(e)) => {
                    return done(
                        Outcome::Failed(format!("cannot create the invocation's cgroup: {e}")),
                        String::new(),
                    );
                }
                Err(e) => {
                    return done(
                        Outcome::Failed(format!("cgroup setup panicked: {e}")),
                        String::new(),
                    );
                }
            }
        }
        Limiter::Rlimit { .. } => None,
    };
    match group.as_ref().and_then(|g| g.0.as_ref()) {
        // The cgroup limits memory (resident, all processes): no address-space cap.
        Some(g) => g.join_before_exec(&mut cmd),
        None => limit_address_space(&mut cmd, req.limits.memory_mb),
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            if let Some(g) = group {
                g.remove().await;
            }
            return done(
                Outcome::Failed(format!("could not start {}: {e}", f.program.display())),
                String::new(),
            );
        }
    };
    let Some(pgid) = child.id() else {
        return done(
            Outcome::Failed("the process vanished right after starting".into()),
            String::new(),
        );
    };
    let pgroup = Group(pgid);
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let tail = Arc::new(Mutex::new(Tail::new(cfg.log_tail_bytes)));
    let tail_text = || tail.lock().unwrap_or_else(PoisonError::into_inner).text();

    let run = async {
        let wait = async {
            let status = child.wait().await;
            // The entrypoint is done: nothing it started may outlive it (and keep the
            // pipes open).
            kill_group(pgid);
            status
        };
        let write = async {
            if let Some(mut w) = stdin {
                // A program that exits without reading its input is fine.
                let _ = w.write_all(&req.input).await;
            }
        };
        let read_out = async {
            match stdout {
                Some(r) => read_capped(r, cfg.max_output_bytes, pgid).await,
                None => (Vec::new(), false),
            }
        };
        let read_err = async {
            if let Some(r) = stderr {
                read_stderr(r, &tail, Splitter::new(req.progress.clone())).await;
            }
        };
        let (status, (out, overflow), (), ()) = tokio::join!(wait, read_out, read_err, write);
        (status, out, overflow)
    };
    let timeout = Duration::from_millis(req.limits.timeout_ms);
    let result = tokio::time::timeout(timeout, run).await;
    let outcome = match result {
        Err(_) => {
            kill_group(pgid);
            let _ = child.wait().await;
            Outcome::TimedOut
        }
        Ok((_, _, true)) => {
            Outcome::Failed(format!("output larger than {} bytes", cfg.max_output_bytes))
        }
        Ok((Err(e), _, _)) => Outcome::Failed(format!("waiting for the process: {e}")),
        Ok((Ok(status), out, false)) => {
            let log = tail_text();
            let line = last_line(&log);
            let how = match (status.code(), status.signal()) {
                (Some(0), _) => None,
                (Some(code), _) => Some(format!("exit status {code}")),
                (None, Some(sig))
                    if sig == libc::SIGKILL
                        && group
                            .as_ref()
                            .and_then(|g| g.0.as_ref())
                            .is_some_and(InvocationGroup::oom_killed) =>
                {
                    Some(format!(
                        "killed by the memory limit ({} MiB, cgroup memory.max)",
                        req.limits.memory_mb
                    ))
                }
                (None, Some(sig)) => Some(format!("killed by signal {sig}")),
                (None, None) => Some("ended abnormally".to_string()),
            };
            match how {
                None => Outcome::Succeeded(out),
                Some(how) if line.is_empty() => Outcome::FunctionError(how),
                Some(how) => Outcome::FunctionError(format!("{how}: {line}")),
            }
        }
    };
    drop(pgroup);
    if let Some(g) = group {
        g.remove().await;
    }
    scratch.remove().await;
    done(outcome, tail_text())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_variables_cannot_replace_the_runtimes() {
        assert!(extra_env_allowed("FERRY_API_URL", "http://127.0.0.1:7070"));
        assert!(extra_env_allowed("_X1", ""));
        assert!(!extra_env_allowed("PATH", "/tmp"));
        assert!(!extra_env_allowed("FERRY_REQUEST_ID", "x"));
        assert!(!extra_env_allowed("1X", "x"));
        assert!(!extra_env_allowed("A=B", "x"));
        assert!(!extra_env_allowed("", "x"));
        assert!(!extra_env_allowed("A", "x\0y"));
    }

    #[test]
    fn scratch_names_are_safe_and_unique() {
        let a = scratch_name("../../etc");
        assert!(a.starts_with("etc-"), "{a}");
        assert_ne!(scratch_name("r1"), scratch_name("r1"));
        assert!(!scratch_name("").is_empty());
    }
}
