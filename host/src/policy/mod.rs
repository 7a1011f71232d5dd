//! WebAssembly policies: validation, prompt sanitization and resilience decisions as
//! wasmtime components that an operator can replace at runtime.
//!
//! `engine` owns wasmtime and the limits, `compile` turns bytes into code off the serving
//! threads, `inspect` refuses bad bytes before compiling, `loaded` calls one version with
//! per-call isolation, `conformance` decides whether a version may be activated, and
//! `registry` holds the active version of each slot with hot swap, rollback and persistence.

pub mod bindings;
mod builtin;
mod compile;
pub mod conformance;
mod convert;
mod engine;
mod error;
mod inspect;
mod kind;
mod loaded;
mod registry;
mod settings;

pub use builtin::builtin_bytes;
pub use compile::{CodeOrigin, sha256_hex};
pub use conformance::{CaseResult, StandardSettings};
pub use convert::OutputLimits;
pub use engine::{EngineLimits, PolicyEngine};
pub use error::{CallError, UploadError};
pub use inspect::{forbidden_import, sdk_compatible};
pub use kind::PolicyKind;
pub use loaded::{LoadedPolicy, PolicyMeta, PolicySource};
pub use registry::{
    ActivationReport, PolicyFailure, Registry, SlotStatus, UploadReport, Used, ValidateError,
    test_component,
};
pub use settings::{OnError, PolicySettings, SlotSettings};
