//! What a policy author implements.

use super::decisions::{AdmitResult, Attempt, Breaker, CallResult, RetryDecision};
use super::sanitization::Sanitized;
use super::{FieldError, GenerationRequest};

/// A validator turns a job's raw `input` JSON into a typed request or a list of field errors.
pub trait Validator {
    /// Shown by `headshot policy list` and the admin API.
    const NAME: &'static str;
    /// The policy's own version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str = "0.0.0";

    /// Receives the operator's `custom` settings (JSON text, `null` when none); the standard
    /// settings are already stored for [`crate::standard_request`]. An error refuses activation.
    fn configure(custom_json: &str) -> Result<(), String> {
        let _ = custom_json;
        Ok(())
    }

    /// Checks one job input. Call [`crate::standard_request`] first to keep the built-in rules.
    fn validate(input_json: &str) -> Result<GenerationRequest, Vec<FieldError>>;
}

/// A sanitizer cleans a prompt or rejects it.
pub trait Sanitizer {
    /// Shown by `headshot policy list` and the admin API.
    const NAME: &'static str;
    /// The policy's own version.
    const VERSION: &'static str = "0.0.0";

    /// Receives the operator's `custom` settings; see [`Validator::configure`].
    fn configure(custom_json: &str) -> Result<(), String> {
        let _ = custom_json;
        Ok(())
    }

    /// Cleans one prompt. [`crate::standard_sanitize`] applies the built-in rules.
    fn sanitize(prompt: &str) -> Sanitized;
}

/// Circuit-breaker and retry decisions; pure functions of their arguments.
pub trait Resilience {
    /// Shown by `headshot policy list` and the admin API.
    const NAME: &'static str;
    /// The policy's own version.
    const VERSION: &'static str = "0.0.0";

    /// Receives the operator's `custom` settings; see [`Validator::configure`].
    fn configure(custom_json: &str) -> Result<(), String> {
        let _ = custom_json;
        Ok(())
    }

    /// May a call go ahead? Returns the decision and the breaker's next state.
    fn admit(current: Breaker, now_ms: u64) -> AdmitResult {
        crate::standard_admit(current, now_ms)
    }

    /// Folds one call's outcome into the breaker.
    fn record_outcome(current: Breaker, seen: CallResult, now_ms: u64) -> Breaker {
        crate::standard_record_outcome(current, seen, now_ms)
    }

    /// Retry after a delay, or give up.
    fn retry(failed: Attempt, jitter: f64) -> RetryDecision {
        crate::standard_retry(failed, jitter)
    }
}
