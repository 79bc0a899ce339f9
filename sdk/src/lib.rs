//! Ferry's SDK, for the two sides of a function call.
//!
//! * **Guest** (feature `guest`): write a Ferry function in Rust and build it as a
//!   WebAssembly component. See [`guest`] and the contract below.
//! * **Client** (feature `client`): invoke deployed functions over HTTP.
//!
//! # The guest contract
//!
//! A WebAssembly function is a WASI preview 2 component that targets the world
//! `ferry:function/handler` (`sdk/wit/handler.wit`):
//!
//! ```wit
//! package ferry:function@0.1.0;
//! world handler {
//!   export handle: func(input: list<u8>) -> result<list<u8>, string>;
//! }
//! ```
//!
//! * `handle` is called once per invocation, with the request body as `input`. Each
//!   invocation gets a fresh instance: no state survives from one call to the next.
//! * `Ok(bytes)` is the response body. `Err(message)` makes the invocation fail with
//!   the error code `function_error` and that message; so does a trap (a panic, an
//!   `unreachable`, running out of the memory limit).
//! * Whatever the function writes to stdout or stderr (`println!`, `eprintln!`) is
//!   kept, the last few KiB of it, as the invocation's log tail.
//! * The environment holds `FERRY_FUNCTION`, `FERRY_VERSION` and `FERRY_REQUEST_ID`,
//!   and nothing else. Clocks and random numbers work.
//! * There is no filesystem (no preopened directories) and no network (sockets and
//!   name lookups are refused).
//! * `limits.memory_mb` caps linear memory and `limits.timeout_ms` the wall-clock
//!   time; a function past its deadline is stopped and the invocation times out.
//!
//! ```ignore
//! struct Hello;
//!
//! impl ferry_sdk::guest::Function for Hello {
//!     fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
//!         Ok(input)
//!     }
//! }
//!
//! ferry_sdk::export!(Hello);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file in
//! `target/wasm32-wasip2/release/` is the component to name in `ferry.toml`'s `module`.

// Lets the generated guest bindings name this crate by its public path.
#[cfg(feature = "guest")]
extern crate self as ferry_sdk;

#[cfg(feature = "guest")]
pub mod guest;

/// `ferry_sdk::export!(MyFunction)`: makes `MyFunction` (which implements
/// [`guest::Function`]) the component's `handle` export.
#[cfg(feature = "guest")]
pub use guest::export;

#[cfg(feature = "client")]
pub mod client;
