//! The built-in rules, callable from any guest with the settings the host configured.

use std::sync::Mutex;

use super::decisions::{AdmitResult, Attempt, Breaker, CallResult, RetryDecision};
use super::sanitization::Sanitized;
use super::{FieldError, GenerationRequest};
use crate::envelope::{self, ResilienceConfig};
use crate::rules::request::ValidatorConfig;
use crate::rules::sanitize::{Sanitizer as PreparedSanitizer, SanitizerConfig};
use crate::rules::{breaker, request, retry};

/// Settings stored by `configure`; an instance serves one configuration for its lifetime.
/// Each kind's part is built only by that kind's `configure` (or on first use), so a
/// validator does not link the sanitizer's Unicode tables and vice versa.
struct Stored {
    validator: Option<ValidatorConfig>,
    sanitizer: Option<PreparedSanitizer>,
    resilience: Option<ResilienceConfig>,
    custom: String,
}

static STORED: Mutex<Option<Stored>> = Mutex::new(None);

fn with_stored<R>(f: impl FnOnce(&mut Stored) -> R) -> R {
    let mut guard = STORED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let stored = guard.get_or_insert_with(|| Stored {
        validator: None,
        sanitizer: None,
        resilience: None,
        custom: "null".into(),
    });
    f(stored)
}

/// Sends a panic's message (with its location) to `host.log` at error level before the
/// module aborts. Without it the text went to stderr, which the host stubs out, and the call
/// failed as a bare trap; the host puts this line into the call's error. Installed by every
/// `configure`, which each new instance runs first.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            // "panicked at src/lib.rs:9:5:\nmessage", on one line.
            super::log::error(&info.to_string().replace('\n', " "));
        }));
    });
}

#[doc(hidden)]
pub fn configure_validator(json: &str) -> Result<(), String> {
    install_panic_hook();
    let env = envelope::parse::<ValidatorConfig>(json, ValidatorConfig::check)?;
    with_stored(|s| {
        s.validator = Some(env.standard);
        s.custom = env.custom.to_string();
    });
    Ok(())
}

#[doc(hidden)]
pub fn configure_sanitizer(json: &str) -> Result<(), String> {
    install_panic_hook();
    let env = envelope::parse::<SanitizerConfig>(json, SanitizerConfig::check)?;
    with_stored(|s| {
        s.sanitizer = Some(PreparedSanitizer::new(env.standard));
        s.custom = env.custom.to_string();
    });
    Ok(())
}

#[doc(hidden)]
pub fn configure_resilience(json: &str) -> Result<(), String> {
    install_panic_hook();
    let env = envelope::parse::<ResilienceConfig>(json, ResilienceConfig::check)?;
    with_stored(|s| {
        s.resilience = Some(env.standard);
        s.custom = env.custom.to_string();
    });
    Ok(())
}

#[doc(hidden)]
pub fn custom_config() -> String {
    with_stored(|s| s.custom.clone())
}

/// The built-in validation rules with the host's limits: a custom validator calls this first
/// and adds its own checks to the result.
pub fn standard_request(input_json: &str) -> Result<GenerationRequest, Vec<FieldError>> {
    with_stored(|s| {
        request::validate_input(
            input_json,
            s.validator.get_or_insert_with(ValidatorConfig::default),
        )
    })
    .map(Into::into)
    .map_err(|errors| errors.into_iter().map(Into::into).collect())
}

/// The built-in sanitizer with the host's settings.
pub fn standard_sanitize(prompt: &str) -> Sanitized {
    with_stored(|s| {
        s.sanitizer
            .get_or_insert_with(|| PreparedSanitizer::new(SanitizerConfig::default()))
            .sanitize(prompt)
    })
    .into()
}

/// The built-in circuit-breaker admission.
pub fn standard_admit(current: Breaker, now_ms: u64) -> AdmitResult {
    let cfg = with_stored(|s| {
        s.resilience
            .get_or_insert_with(ResilienceConfig::default)
            .breaker
            .clone()
    });
    let (decision, next) = breaker::admit(&current.into(), &cfg, now_ms);
    AdmitResult {
        decision: decision.into(),
        next: next.into(),
    }
}

/// The built-in circuit-breaker bookkeeping.
pub fn standard_record_outcome(current: Breaker, seen: CallResult, now_ms: u64) -> Breaker {
    let cfg = with_stored(|s| {
        s.resilience
            .get_or_insert_with(ResilienceConfig::default)
            .breaker
            .clone()
    });
    breaker::record_outcome(&current.into(), &cfg, &seen.into(), now_ms).into()
}

/// The built-in retry schedule.
pub fn standard_retry(failed: Attempt, jitter: f64) -> RetryDecision {
    let cfg = with_stored(|s| {
        s.resilience
            .get_or_insert_with(ResilienceConfig::default)
            .retry
            .clone()
    });
    retry::decide(&failed.into(), jitter, &cfg).into()
}
