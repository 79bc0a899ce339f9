//! Ferry's shared vocabulary.
//!
//! Everything more than one component must agree on lives here: the order protocol
//! ([`proto`]), the error vocabulary mapped to HTTP and gRPC ([`error`]), the package
//! format ([`package`]), the store's key schema and records ([`keys`], [`model`]),
//! IDs ([`id`]), layered configuration ([`config`]) and telemetry setup ([`telemetry`]).

pub mod config;
pub mod error;
pub mod id;
pub mod keys;
pub mod model;
pub mod package;
pub mod task;
pub mod telemetry;

/// Generated code for `proto/order.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("ferry.order.v1");
}

pub use error::{Error, ErrorCode};

/// Largest gRPC message between components: a 64 MiB function output or a 6 MiB
/// input, with room for the envelope (tonic's default of 4 MiB is below both).
pub const MAX_GRPC_MESSAGE: usize = 80 << 20;

/// gRPC metadata carrying the cluster credential (`Bearer TOKEN`).
pub const AUTH_METADATA: &str = "authorization";

/// Milliseconds since the Unix epoch, for records and IDs.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
