//! WebAssembly components through wasmtime.
//!
//! One [`Engine`] per runtime, with the pooling allocator (instance slots are
//! reserved once and recycled, so instantiation costs microseconds) and epoch
//! interruption driven by a ticker thread (deadlines with [`TICK`] granularity).
//! A prepared function is a [`HandlerPre`]: the component with its imports already
//! resolved against the WASI linker. Each invocation gets a fresh [`Store`].

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap,
};
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::tail::{TailPipe, last_line};
use crate::{Config, Invocation, Outcome, Request, RuntimeError, write_atomic};

mod bindings {
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../sdk/wit",
    });
}

use bindings::HandlerPre;

/// How often the epoch advances: the resolution of wasm deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Epoch ticks for a timeout: rounded up, plus one because the current tick may
/// end right away.
fn deadline_ticks(timeout_ms: u64) -> u64 {
    timeout_ms
        .div_ceil(TICK.as_millis() as u64)
        .saturating_add(1)
}

/// The store data of one invocation.
pub(crate) struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory at the invocation's `limits.memory_mb` and remembers whether a
/// growth was refused, so the failure can be reported as a memory problem.
struct MemoryLimiter {
    max_bytes: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Past the pool's per-memory maximum (`max_wasm_memory_mb`).
        self.hit = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The pooling allocator caps table elements.
        Ok(true)
    }
}

/// A prepared wasm function: the pre-instantiated template.
#[derive(Clone)]
pub(crate) struct WasmFunction {
    pre: HandlerPre<Host>,
}

pub(crate) struct WasmEngine {
    engine: Engine,
    linker: Linker<Host>,
    /// Identifies the engine's compilation settings in compiled artifact names.
    compat: String,
    _ticker: Ticker,
}

/// Advances the engine's epoch every [`TICK`] until dropped.
struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> Result<Self, RuntimeError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ferry-epoch".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    engine.increment_epoch();
                }
            })
            .map_err(|e| RuntimeError::Internal(format!("start the epoch ticker: {e}")))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Collects what a `Hash` impl feeds in, to digest it with a stable hash.
struct Collect(Vec<u8>);

impl Hasher for Collect {
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn finish(&self) -> u64 {
        0
    }
}

impl WasmEngine {
    pub(crate) fn new(cfg: &Config) -> Result<Self, RuntimeError> {
        let n = cfg.max_instances;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            // A Rust component is a few core instances (the program, the WASI adapter,
            // shims) sharing one linear memory, with a couple of tables.
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n)
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(usize::try_from(cfg.max_wasm_memory_mb << 20).unwrap_or(usize::MAX));
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(|e| RuntimeError::Internal(format!("create the wasm engine: {e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| RuntimeError::Internal(format!("link WASI: {e:#}")))?;
        let mut h = Collect(Vec::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let compat = ferry_core::id::sha256_hex(&h.0)[..16].to_string();
        let ticker = Ticker::start(engine.clone())?;
        Ok(Self {
            engine,
            linker,
            compat,
            _ticker: ticker,
        })
    }

    /// Compiles (or loads the cached compile of) a component and pre-instantiates it.
    /// Returns whether the compiled artifact came from disk.
    pub(crate) fn prepare(
        &self,
        cache_dir: &Path,
        sha: &str,
        wasm: &[u8],
    ) -> Result<(WasmFunction, bool), RuntimeError> {
        check_component(wasm)?;
        let cwasm = cache_dir
            .join("compiled")
            .join(format!("{sha}-{}.cwasm", self.compat));
        let (component, from_disk) = match self.load(&cwasm) {
            Some(c) => (c, true),
            None => {
                let c = Component::new(&self.engine, wasm)
                    .map_err(|e| RuntimeError::Compile(format!("{e:#}")))?;
                match c.serialize() {
                    Ok(bytes) => {
                        if let Err(e) = write_atomic(&cwasm, &bytes) {
                            tracing::warn!(sha, "could not cache the compiled component: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(sha, "could not serialize the compiled component: {e:#}")
                    }
                }
                (c, false)
            }
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            RuntimeError::Compile(format!(
                "the component imports something Ferry does not provide (WASI p2 only): {e:#}"
            ))
        })?;
        let pre = HandlerPre::new(pre).map_err(|e| {
            RuntimeError::Compile(format!(
                "the component does not export `handle: func(input: list<u8>) -> result<list<u8>, string>` \
                 (world ferry:function/handler): {e:#}"
            ))
        })?;
        Ok((WasmFunction { pre }, from_disk))
    }

    #[allow(unsafe_code)]
    fn load(&self, path: &Path) -> Option<Component> {
        if !path.exists() {
            return None;
        }
        // SAFETY: this file is an artifact this runtime wrote itself with
        // `Component::serialize` into its own cache directory (renamed into place only
        // once complete), named after the package sha and this engine's compatibility
        // hash; wasmtime also checks the header against the engine's configuration.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), "unusable compiled artifact, recompiling: {e:#}");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// One invocation: instantiate, call `handle`, drop.
    pub(crate) fn invoke(
        &self,
        f: &WasmFunction,
        req: &Request,
        cfg: &Config,
        log: TailPipe,
    ) -> Invocation {
        let start = Instant::now();
        let memory_mb = req.limits.memory_mb.min(cfg.max_wasm_memory_mb);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(log.clone())
            .stderr(log.clone())
            .arg(&req.function)
            .env("FERRY_FUNCTION", &req.function)
            .env("FERRY_VERSION", req.version.to_string())
            .env("FERRY_REQUEST_ID", &req.request_id)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let host = Host {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: usize::try_from(memory_mb << 20).unwrap_or(usize::MAX),
                hit: false,
            },
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limiter);
        store.set_epoch_deadline(deadline_ticks(req.limits.timeout_ms));
        let result = match f.pre.instantiate(&mut store) {
            Ok(handler) => handler
                .call_handle(&mut store, &req.input)
                .map_err(|e| (e, false)),
            Err(e) => Err((e, true)),
        };
        let memory_hit = store.data().limiter.hit;
        drop(store);
        let log_tail = log.text();
        let outcome = match result {
            Ok(Ok(out)) if out.len() > cfg.max_output_bytes => {
                Outcome::Failed(format!("output larger than {} bytes", cfg.max_output_bytes))
            }
            Ok(Ok(out)) => Outcome::Succeeded(out),
            Ok(Err(message)) => Outcome::FunctionError(message),
            Err((e, instantiating)) => {
                classify(&e, instantiating, memory_hit, memory_mb, &log_tail)
            }
        };
        Invocation {
            outcome,
            log_tail,
            duration: start.elapsed(),
        }
    }
}

/// Turns a wasmtime error into the invocation's outcome.
fn classify(
    e: &wasmtime::Error,
    instantiating: bool,
    memory_hit: bool,
    memory_mb: u64,
    log_tail: &str,
) -> Outcome {
    let trap = e.downcast_ref::<Trap>();
    if trap == Some(&Trap::Interrupt) {
        return Outcome::TimedOut;
    }
    let detail = match trap {
        Some(t) => t.to_string(),
        None => e.root_cause().to_string(),
    };
    if memory_hit {
        return Outcome::FunctionError(format!(
            "memory limit exceeded: the function needed more than {memory_mb} MiB of memory ({detail})"
        ));
    }
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return Outcome::FunctionError(format!(
            "the function exited with status {} instead of returning",
            exit.0
        ));
    }
    if trap.is_none() && instantiating {
        // Not the guest's fault: no free instance slot and the like.
        return Outcome::Failed(format!("could not instantiate: {e:#}"));
    }
    let line = last_line(log_tail);
    if line.is_empty() {
        Outcome::FunctionError(format!("trap: {detail}"))
    } else {
        Outcome::FunctionError(format!("trap: {detail} (last log line: {line})"))
    }
}

/// Refuses anything but a component: a core module gets a hint about the target.
fn check_component(bytes: &[u8]) -> Result<(), RuntimeError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(RuntimeError::Compile(
            "the module is not a WebAssembly binary".into(),
        ));
    }
    match [bytes[6], bytes[7]] {
        [1, 0] => Ok(()),
        [0, 0] => Err(RuntimeError::Compile(
            "the module is a core WebAssembly module, not a component: build for wasm32-wasip2 \
             (or wrap it with `wasm-tools component new`)"
                .into(),
        )),
        _ => Err(RuntimeError::Compile(
            "unknown WebAssembly binary layer".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up() {
        assert_eq!(deadline_ticks(1), 2);
        assert_eq!(deadline_ticks(5), 2);
        assert_eq!(deadline_ticks(6), 3);
    }

    #[test]
    fn only_components_pass_the_header_check() {
        assert!(check_component(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(
            check_component(b"\0asm\x01\0\0\0")
                .unwrap_err()
                .to_string()
                .contains("core WebAssembly module")
        );
        assert!(check_component(b"garbage!").is_err());
    }
}
