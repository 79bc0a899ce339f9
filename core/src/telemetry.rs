//! Logging setup shared by every binary. `FERRY_LOG` (or `RUST_LOG`) sets the filter.

use crate::config::Env;

/// Installs a stderr `tracing` subscriber once; later calls do nothing.
pub fn init(env: &Env, default_filter: &str) {
    let filter = env
        .get("FERRY_LOG")
        .or_else(|| env.get("RUST_LOG"))
        .unwrap_or(default_filter);
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
