//! The built-in policy rules, independent of WebAssembly.
//!
//! Everything here is pure (input in, decision out; time and randomness are parameters) so
//! the built-in components, custom policies and the host's native fallback run the very same
//! logic, and so it can be unit-tested natively. The rules run on untrusted input inside wasm
//! guests, where a panic is a bug: nothing below unwraps, indexes or does arithmetic on
//! input-dependent values in a way that can panic or overflow.
#![deny(unsafe_code, missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod breaker;
pub mod request;
pub mod retry;
pub mod sanitize;

pub use breaker::{
    Admission, Breaker, BreakerConfig, Bucket, CallResult, Outcome, State, WindowType, admit,
    force_open, rates, record_outcome, reset,
};
pub use request::{
    FIELDS, FieldError, Request, ValidatorConfig, check_request, user_id_is_safe, validate_input,
    validate_value,
};
pub use retry::{Attempt, ErrorKind, GiveUpReason, Jitter, RetryConfig, RetryDecision, decide};
pub use sanitize::{Sanitized, SanitizerConfig, sanitize};
