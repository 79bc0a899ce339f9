//! The guest side: what a Ferry WebAssembly function is written against.
//!
//! Implement [`Function`] for a type and name it in [`export!`](crate::export):
//!
//! ```ignore
//! struct Echo;
//!
//! impl ferry_sdk::guest::Function for Echo {
//!     fn handle(input: Vec<u8>) -> Result<Vec<u8>, String> {
//!         Ok(input)
//!     }
//! }
//!
//! ferry_sdk::export!(Echo);
//! ```
//!
//! See the [crate documentation](crate) for the contract.

#[allow(unsafe_code, missing_docs, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        world: "handler",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "ferry_sdk::guest",
        runtime_path: "ferry_sdk::guest::__rt",
    });
}

/// What a function implements: one call per invocation.
///
/// `handle` receives the request body and returns the response body, or an error
/// message (reported with the code `function_error`).
pub use bindings::Guest as Function;

// The `export!` macro expands to paths under `ferry_sdk::guest`; these are for it.
#[doc(hidden)]
pub use bindings::*;

#[doc(hidden)]
pub use wit_bindgen::rt as __rt;
