//! Host bindings generated from `plugins-sdk/wit`, the single source of the policy interface.
//!
//! The three worlds share the `types` and `host` interfaces, so one `log` implementation and
//! one set of record types serve every policy kind.
#![allow(missing_docs, clippy::all)]

/// The `validator` world (and the shared `types`/`host` interfaces).
pub mod validator {
    wasmtime::component::bindgen!({
        path: "../plugins-sdk/wit",
        world: "validator",
    });
}

/// The `sanitizer` world.
pub mod sanitizer {
    wasmtime::component::bindgen!({
        path: "../plugins-sdk/wit",
        world: "sanitizer",
        with: {
            "headshot:policy/types": crate::policy::bindings::validator::headshot::policy::types,
            "headshot:policy/host": crate::policy::bindings::validator::headshot::policy::host,
        },
    });
}

/// The `resilience` world.
pub mod resilience {
    wasmtime::component::bindgen!({
        path: "../plugins-sdk/wit",
        world: "resilience",
        with: {
            "headshot:policy/types": crate::policy::bindings::validator::headshot::policy::types,
            "headshot:policy/host": crate::policy::bindings::validator::headshot::policy::host,
        },
    });
}

pub use validator::headshot::policy::host::Level;
pub use validator::headshot::policy::types::{FieldError, GenerationRequest, PolicyInfo};
