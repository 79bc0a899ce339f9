//! How a function runs.
//!
//! A [`Runtime`] holds a node's function packages, keyed by the sha256 of their
//! bytes, and runs invocations of them:
//!
//! * **wasm** packages are WebAssembly components (WASI preview 2, world
//!   `ferry:function/handler`, see `sdk/wit/handler.wit`). [`Runtime::prepare`]
//!   compiles one once (cached on disk as `compiled/<sha>-<engine>.cwasm`) and keeps a
//!   pre-instantiated template in memory; each invocation instantiates it in a fresh
//!   `Store` from a pooling allocator, calls `handle`, and drops it. Each invocation is
//!   sandboxed: no preopened directories, no sockets or name lookups, an environment
//!   of only `FERRY_FUNCTION`, `FERRY_VERSION`, `FERRY_REQUEST_ID`, linear memory
//!   capped at `limits.memory_mb`, and a deadline of `limits.timeout_ms` enforced by
//!   epoch interruption.
//! * **native** packages are unpacked into `unpacked/<sha>/` and their entrypoint is
//!   run as a process per invocation: input on stdin, output on stdout, in a scratch
//!   directory, with a cleared environment, its own process group (killed as a
//!   whole on timeout) and `RLIMIT_AS` as memory limit (see [`native`] for details).
//!
//! The cache directory layout: `packages/<sha>.tar.gz` (the verified package bytes),
//! `compiled/<sha>-<engine hash>.cwasm`, `unpacked/<sha>/`, `scratch/<invocation>/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ferry_core::package::{Kind, Limits};
use ferry_core::{Error, ErrorCode};
pub use progress::Progress;

pub mod cgroup;
pub mod native;
pub mod progress;
mod tail;
mod wasm;

/// Runtime settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where packages, compiled artifacts, unpacked native packages and scratch
    /// directories live.
    pub cache_dir: PathBuf,
    /// Concurrent wasm instances (the pooling allocator's size).
    pub max_instances: u32,
    /// The most linear memory one wasm instance may ever have, whatever its limits say.
    pub max_wasm_memory_mb: u64,
    /// The most a package may unpack to.
    pub max_unpacked_bytes: u64,
    /// How much of an invocation's log (wasm: stdout + stderr; native: stderr) is kept.
    pub log_tail_bytes: usize,
    /// The largest response body an invocation may produce.
    pub max_output_bytes: usize,
    /// How native functions' CPU and memory are limited: a cgroup v2 per invocation
    /// where possible, rlimits otherwise (see [`cgroup`]).
    pub cgroup: cgroup::CgroupSetting,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cache_dir: PathBuf::from("./.ferry/cache"),
            max_instances: 64,
            max_wasm_memory_mb: 256,
            max_unpacked_bytes: 1 << 30,
            log_tail_bytes: 4096,
            max_output_bytes: 64 << 20,
            cgroup: cgroup::CgroupSetting::Auto,
        }
    }
}

/// One invocation's input and context.
#[derive(Clone, Debug)]
pub struct Request {
    pub input: Vec<u8>,
    pub limits: Limits,
    pub function: String,
    pub version: u32,
    pub request_id: String,
    /// Where a native function's progress reports go while it runs (see [`progress`]
    /// for the stderr line format); `None`: they are parsed and dropped. Never part of
    /// the log tail either way.
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<Progress>>,
    /// Extra environment variables for a native function (e.g. the operator's
    /// `FERRY_API_URL` / `FERRY_API_TOKEN`), set after the allow-listed ones; the
    /// runtime's own names (`PATH`, `HOME`, `TMPDIR`, `LANG`, `FERRY_FUNCTION`,
    /// `FERRY_VERSION`, `FERRY_REQUEST_ID`) cannot be replaced and are skipped, as are
    /// invalid names. Ignored by wasm functions.
    pub env: Vec<(String, String)>,
}

/// How an invocation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The response body.
    Succeeded(Vec<u8>),
    /// The function failed: an error it returned, a trap, a non-zero exit, running out
    /// of memory. The message is for the caller.
    FunctionError(String),
    /// The function ran past `limits.timeout_ms` and was stopped.
    TimedOut,
    /// The platform could not run it (no instance slot, the process could not be
    /// started, the output was too large).
    Failed(String),
}

impl Outcome {
    /// The error code this outcome is reported with, `None` for success.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Outcome::Succeeded(_) => None,
            Outcome::FunctionError(_) => Some(ErrorCode::FunctionError),
            Outcome::TimedOut => Some(ErrorCode::Timeout),
            Outcome::Failed(_) => Some(ErrorCode::Internal),
        }
    }
}

/// The result of one invocation.
#[derive(Clone, Debug)]
pub struct Invocation {
    pub outcome: Outcome,
    /// The end of what the function logged (wasm: stdout and stderr; native: stderr).
    pub log_tail: String,
    /// Wall-clock time of the invocation itself (instantiate + run, or spawn + wait).
    pub duration: Duration,
}

/// What [`Runtime::prepare`] did.
#[derive(Clone, Debug)]
pub struct PrepareInfo {
    pub kind: Kind,
    /// The function's name from its manifest.
    pub name: String,
    /// wasm: the compiled artifact came from the disk cache rather than a compile.
    pub compiled_from_disk: bool,
    /// It was already prepared in memory; nothing was done.
    pub already_prepared: bool,
    pub took: Duration,
}

/// Platform-side failures. A function's own failures are [`Outcome`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("package hash mismatch: expected {expected}, got {actual}")]
    HashMismatch { expected: String, actual: String },
    /// The package is invalid; the error keeps its code (`unsafe_archive`, ...).
    #[error("{0}")]
    Package(Error),
    /// The wasm module is not a usable component.
    #[error("invalid wasm: {0}")]
    Compile(String),
    #[error("package {0} is not prepared on this node")]
    NotPrepared(String),
    #[error("i/o: {0}")]
    Io(String),
    #[error("runtime: {0}")]
    Internal(String),
}

impl RuntimeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RuntimeError::HashMismatch { .. } => ErrorCode::InvalidPackage,
            RuntimeError::Package(e) => e.code,
            RuntimeError::Compile(_) => ErrorCode::InvalidWasm,
            RuntimeError::NotPrepared(_) => ErrorCode::PackageNotFound,
            RuntimeError::Io(_) | RuntimeError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<RuntimeError> for Error {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::Package(e) => e,
            e => Error::new(e.code(), e.to_string()),
        }
    }
}

fn io_error(what: impl std::fmt::Display, path: &Path, e: std::io::Error) -> RuntimeError {
    RuntimeError::Io(format!("{what} {}: {e}", path.display()))
}

/// A prepared package, ready to run.
enum Prepared {
    Wasm(wasm::WasmFunction),
    Native(native::NativeFunction),
}

impl Prepared {
    fn kind(&self) -> Kind {
        match self {
            Prepared::Wasm(_) => Kind::Wasm,
            Prepared::Native(_) => Kind::Native,
        }
    }
}

/// The function runtime of one node. Cheap to clone; the ticker thread that drives
/// wasm deadlines stops once the last clone is dropped.
#[derive(Clone)]
pub struct Runtime(Arc<Inner>);

struct Inner {
    cfg: Config,
    wasm: wasm::WasmEngine,
    prepared: RwLock<HashMap<String, Arc<(String, Prepared)>>>,
    /// One lock per sha being prepared, so concurrent prepares of one package do the
    /// work once and different packages prepare in parallel.
    preparing: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// One permit per wasm instance slot: invocations past the pool's size queue here
    /// instead of failing to instantiate.
    wasm_slots: Arc<tokio::sync::Semaphore>,
    /// What limits native functions here (decided once, at start).
    limiter: cgroup::Limiter,
}

impl Runtime {
    pub fn new(mut cfg: Config) -> Result<Self, RuntimeError> {
        if cfg.max_instances == 0 || cfg.max_wasm_memory_mb == 0 {
            return Err(RuntimeError::Internal(
                "max_instances and max_wasm_memory_mb must be at least 1".into(),
            ));
        }
        for sub in ["packages", "compiled", "unpacked", "scratch"] {
            let dir = cfg.cache_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        }
        // Native entrypoints run with the scratch directory as cwd: paths must be absolute.
        cfg.cache_dir = std::fs::canonicalize(&cfg.cache_dir)
            .map_err(|e| io_error("resolve", &cfg.cache_dir, e))?;
        let wasm = wasm::WasmEngine::new(&cfg)?;
        let limiter = cgroup::decide(&cfg.cgroup, &cgroup::read_host());
        tracing::info!(limits = %limiter.describe(), "native functions are limited by");
        Ok(Self(Arc::new(Inner {
            limiter,
            wasm,
            prepared: RwLock::new(HashMap::new()),
            preparing: Mutex::new(HashMap::new()),
            wasm_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_instances as usize)),
            cfg,
        })))
    }

    pub fn config(&self) -> &Config {
        &self.0.cfg
    }

    /// What limits native functions' CPU and memory on this node: a cgroup v2 per
    /// invocation, or rlimits (with the reason).
    pub fn native_limits(&self) -> &cgroup::Limiter {
        &self.0.limiter
    }

    fn package_path(&self, sha: &str) -> PathBuf {
        self.0
            .cfg
            .cache_dir
            .join("packages")
            .join(format!("{sha}.tar.gz"))
    }

    /// Verifies `sha256(bytes) == sha`, keeps the package in the cache directory and
    /// makes it runnable: wasm → compiled (or loaded from the compiled cache) and
    /// pre-instantiated; native → unpacked. Idempotent and safe to call concurrently
    /// for the same sha. Blocking and CPU-heavy: call it from `spawn_blocking`.
    pub fn prepare(&self, sha: &str, bytes: &[u8]) -> Result<PrepareInfo, RuntimeError> {
        let actual = ferry_core::id::sha256_hex(bytes);
        if actual != sha {
            return Err(RuntimeError::HashMismatch {
                expected: sha.to_string(),
                actual,
            });
        }
        self.prepare_verified(sha, bytes, true)
    }

    /// Makes a package runnable from the disk cache alone (after a restart). `Ok(false)`
    /// when the package is not on disk (or its file is damaged, which is then removed).
    /// Blocking: call it from `spawn_blocking`.
    pub fn prepare_from_disk(&self, sha: &str) -> Result<bool, RuntimeError> {
        if self.is_prepared(sha) {
            return Ok(true);
        }
        if !ferry_core::id::valid_sha256(sha) {
            return Ok(false);
        }
        let path = self.package_path(sha);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error("read", &path, e)),
        };
        if ferry_core::id::sha256_hex(&bytes) != sha {
            tracing::warn!(sha, "cached package is damaged; removing it");
            let _ = std::fs::remove_file(&path);
            return Ok(false);
        }
        self.prepare_verified(sha, &bytes, false)?;
        Ok(true)
    }

    fn prepare_verified(
        &self,
        sha: &str,
        bytes: &[u8],
        write: bool,
    ) -> Result<PrepareInfo, RuntimeError> {
        let start = Instant::now();
        let lock = {
            let mut map = self
                .0
                .preparing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            map.entry(sha.to_string()).or_default().clone()
        };
        let result = {
            let _held = lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.prepare_locked(sha, bytes, write, start)
        };
        {
            let mut map = self
                .0
                .preparing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Only the map and this call hold it: nobody else is waiting.
            if Arc::strong_count(&lock) == 2 {
                map.remove(sha);
            }
        }
        result
    }

    fn prepare_locked(
        &self,
        sha: &str,
        bytes: &[u8],
        write: bool,
        start: Instant,
    ) -> Result<PrepareInfo, RuntimeError> {
        if let Some(p) = self.get(sha) {
            return Ok(PrepareInfo {
                kind: p.1.kind(),
                name: p.0.clone(),
                compiled_from_disk: false,
                already_prepared: true,
                took: start.elapsed(),
            });
        }
        let cfg = &self.0.cfg;
        let inspected = ferry_core::package::inspect(bytes, cfg.max_unpacked_bytes)
            .map_err(RuntimeError::Package)?;
        let manifest = inspected.manifest;
        let (prepared, compiled_from_disk) = match manifest.kind {
            Kind::Wasm => {
                let (f, from_disk) = self.0.wasm.prepare(&cfg.cache_dir, sha, &inspected.entry)?;
                (Prepared::Wasm(f), from_disk)
            }
            Kind::Native => {
                let dir = cfg.cache_dir.join("unpacked").join(sha);
                let f = native::NativeFunction::prepare(
                    bytes,
                    &dir,
                    &manifest.entrypoint,
                    cfg.max_unpacked_bytes,
                )?;
                (Prepared::Native(f), false)
            }
        };
        // Kept only once it proved runnable, so the disk cache holds no refused packages.
        if write {
            write_atomic(&self.package_path(sha), bytes)?;
        }
        let kind = prepared.kind();
        self.0
            .prepared
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sha.to_string(), Arc::new((manifest.name.clone(), prepared)));
        let took = start.elapsed();
        tracing::info!(sha, name = %manifest.name, kind = kind.as_str(), compiled_from_disk, ?took, "package prepared");
        Ok(PrepareInfo {
            kind,
            name: manifest.name,
            compiled_from_disk,
            already_prepared: false,
            took,
        })
    }

    fn get(&self, sha: &str) -> Option<Arc<(String, Prepared)>> {
        self.0
            .prepared
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sha)
            .cloned()
    }

    /// Whether the package is prepared in memory (cheap).
    pub fn is_prepared(&self, sha: &str) -> bool {
        self.0
            .prepared
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(sha)
    }

    /// The shas of the packages in the disk cache.
    pub fn cached_packages(&self) -> Vec<String> {
        let dir = self.0.cfg.cache_dir.join("packages");
        let mut shas: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        let sha = name.strip_suffix(".tar.gz")?;
                        ferry_core::id::valid_sha256(sha).then(|| sha.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        shas.sort();
        shas
    }

    /// Runs one invocation of a prepared package. Errors only for platform problems
    /// (the package is not prepared, ...); the function's own failures are [`Outcome`]s.
    pub async fn invoke(&self, sha: &str, req: Request) -> Result<Invocation, RuntimeError> {
        let prepared = self
            .get(sha)
            .ok_or_else(|| RuntimeError::NotPrepared(sha.to_string()))?;
        match &prepared.1 {
            Prepared::Wasm(f) => {
                let f = f.clone();
                let rt = self.clone();
                let log = tail::TailPipe::new(self.0.cfg.log_tail_bytes);
                let log2 = log.clone();
                let start = Instant::now();
                let timeout = Duration::from_millis(req.limits.timeout_ms);
                let slots = self.0.wasm_slots.clone();
                let Ok(Ok(permit)) = tokio::time::timeout(timeout, slots.acquire_owned()).await
                else {
                    let n = self.0.cfg.max_instances;
                    let outcome = Outcome::Failed(format!(
                        "all {n} wasm instance slots stayed busy past the deadline"
                    ));
                    return Ok(Invocation {
                        outcome,
                        log_tail: String::new(),
                        duration: start.elapsed(),
                    });
                };
                let task = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    rt.0.wasm.invoke(&f, &req, &rt.0.cfg, log2)
                });
                // Epoch interruption stops guest code at its deadline; this backstop only
                // matters for a guest blocked inside a host call (a long sleep).
                match tokio::time::timeout(timeout + BACKSTOP_GRACE, task).await {
                    Ok(Ok(inv)) => Ok(inv),
                    Ok(Err(e)) => Err(RuntimeError::Internal(format!(
                        "wasm invocation task failed: {e}"
                    ))),
                    Err(_) => Ok(Invocation {
                        outcome: Outcome::TimedOut,
                        log_tail: log.text(),
                        duration: start.elapsed(),
                    }),
                }
            }
            Prepared::Native(f) => Ok(native::invoke(f, &req, &self.0.cfg, &self.0.limiter).await),
        }
    }

    /// The wasm path without tokio, for benchmarks: instantiate from the
    /// pre-instantiated template, call `handle`, drop. Meant for threads outside any
    /// tokio runtime (async code should use [`Runtime::invoke`]): WASI's synchronous
    /// host calls drive futures with `block_on`, which a runtime thread forbids, so
    /// inside a runtime this moves the call to a plain thread first (slower). It does
    /// not queue for an instance slot: past `max_instances` concurrent calls it answers
    /// `Outcome::Failed`.
    pub fn invoke_wasm_blocking(
        &self,
        sha: &str,
        req: &Request,
    ) -> Result<Invocation, RuntimeError> {
        let prepared = self
            .get(sha)
            .ok_or_else(|| RuntimeError::NotPrepared(sha.to_string()))?;
        let Prepared::Wasm(f) = &prepared.1 else {
            return Err(RuntimeError::Internal(format!(
                "package {sha} is native, not wasm"
            )));
        };
        let run = || {
            self.0.wasm.invoke(
                f,
                req,
                &self.0.cfg,
                tail::TailPipe::new(self.0.cfg.log_tail_bytes),
            )
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Ok(run());
        }
        std::thread::scope(|s| s.spawn(run).join())
            .map_err(|_| RuntimeError::Internal("the wasm invocation thread panicked".into()))
    }
}

/// How long past its deadline a wasm invocation blocked in a host call is waited for.
const BACKSTOP_GRACE: Duration = Duration::from_secs(1);

/// Writes a file whole or not at all: into a temporary sibling, then renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    if path.exists() {
        return Ok(());
    }
    let dir = path
        .parent()
        .ok_or_else(|| RuntimeError::Internal(format!("{} has no parent", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", ferry_core::id::new_id()));
    let result = std::fs::write(&tmp, bytes)
        .map_err(|e| io_error("write", &tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io_error("rename into", path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes() {
        let pkg = RuntimeError::Package(Error::new(ErrorCode::UnsafeArchive, "bad"));
        assert_eq!(pkg.code(), ErrorCode::UnsafeArchive);
        assert_eq!(Error::from(pkg).code, ErrorCode::UnsafeArchive);
        assert_eq!(
            RuntimeError::Compile("x".into()).code(),
            ErrorCode::InvalidWasm
        );
        assert_eq!(
            Error::from(RuntimeError::NotPrepared("s".into())).code,
            ErrorCode::PackageNotFound
        );
    }
}
