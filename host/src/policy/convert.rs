//! Host-side conversions between generated WIT types and the plain SDK rule types, with
//! the output limits applied to everything that comes out of a guest.

use headshot_plugin_sdk::rules::{breaker, request, retry, sanitize};

use super::bindings::resilience::exports::headshot::policy::decisions as wit;
use super::bindings::sanitizer::exports::headshot::policy::sanitization::Sanitized;
use super::bindings::{FieldError, GenerationRequest};
use super::error::CallError;

/// Caps on what a guest may hand back; larger answers are refused as policy errors.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputLimits {
    /// Most field errors in one validation answer.
    pub max_errors: usize,
    /// Longest field-error `field` or `code`, bytes.
    pub max_label_bytes: usize,
    /// Longest field-error message or change note, bytes.
    pub max_message_bytes: usize,
    /// Longest prompt a validator or sanitizer may return, bytes.
    pub max_prompt_bytes: usize,
    /// Most change notes in one sanitizer answer.
    pub max_changes: usize,
    /// Most breaker buckets in one resilience answer.
    pub max_buckets: usize,
}

impl OutputLimits {
    /// Limits derived from the longest accepted prompt (UTF-8 is at most 4 bytes a char).
    pub fn for_prompt_chars(max_prompt_chars: usize) -> Self {
        Self {
            max_errors: 64,
            max_label_bytes: 256,
            max_message_bytes: 1024,
            max_prompt_bytes: max_prompt_chars.saturating_mul(4).max(64),
            max_changes: 32,
            max_buckets: 10_000,
        }
    }
}

fn too_big(what: &str, len: usize, limit: usize) -> CallError {
    CallError::Output(format!("{what} is {len} bytes; the limit is {limit}"))
}

/// A validation answer as rule types, size-checked.
pub fn validation(
    answer: Result<GenerationRequest, Vec<FieldError>>,
    limits: &OutputLimits,
) -> Result<Result<request::Request, Vec<request::FieldError>>, CallError> {
    match answer {
        Ok(r) => {
            if r.prompt.len() > limits.max_prompt_bytes {
                return Err(too_big(
                    "returned prompt",
                    r.prompt.len(),
                    limits.max_prompt_bytes,
                ));
            }
            for (what, s) in [("returned user_id", &r.user_id)] {
                if s.len() > limits.max_label_bytes {
                    return Err(too_big(what, s.len(), limits.max_label_bytes));
                }
            }
            if let Some(style) = &r.style
                && style.len() > limits.max_label_bytes
            {
                return Err(too_big(
                    "returned style",
                    style.len(),
                    limits.max_label_bytes,
                ));
            }
            Ok(Ok(request::Request {
                prompt: r.prompt,
                user_id: r.user_id,
                width: r.width,
                height: r.height,
                num_images: r.num_images,
                steps: r.steps,
                guidance: r.guidance,
                seed: r.seed,
                style: r.style,
            }))
        }
        Err(errors) => {
            if errors.is_empty() {
                return Err(CallError::Output(
                    "rejected the input without naming a field error".into(),
                ));
            }
            if errors.len() > limits.max_errors {
                return Err(CallError::Output(format!(
                    "returned {} field errors; the limit is {}",
                    errors.len(),
                    limits.max_errors
                )));
            }
            errors
                .into_iter()
                .map(|e| field_error(e, limits))
                .collect::<Result<Vec<_>, _>>()
                .map(Err)
        }
    }
}

/// A field error as a rule type, size-checked.
pub fn field_error(e: FieldError, limits: &OutputLimits) -> Result<request::FieldError, CallError> {
    for (what, s, limit) in [
        ("field-error field", &e.field, limits.max_label_bytes),
        ("field-error code", &e.code, limits.max_label_bytes),
        ("field-error message", &e.message, limits.max_message_bytes),
    ] {
        if s.len() > limit {
            return Err(too_big(what, s.len(), limit));
        }
    }
    Ok(request::FieldError {
        field: e.field,
        code: e.code,
        message: e.message,
    })
}

/// A sanitizer answer as a rule type, size-checked against the prompt it was given.
pub fn sanitized(
    answer: Sanitized,
    input_len: usize,
    limits: &OutputLimits,
) -> Result<sanitize::Sanitized, CallError> {
    Ok(match answer {
        Sanitized::Unchanged => sanitize::Sanitized::Unchanged,
        Sanitized::Reject(e) => sanitize::Sanitized::Reject(field_error(e, limits)?),
        Sanitized::Cleaned(c) => {
            let cap = limits
                .max_prompt_bytes
                .min(input_len.saturating_mul(2).max(64));
            if c.text.len() > cap {
                return Err(too_big("cleaned prompt", c.text.len(), cap));
            }
            if c.changes.len() > limits.max_changes {
                return Err(CallError::Output(format!(
                    "returned {} change notes; the limit is {}",
                    c.changes.len(),
                    limits.max_changes
                )));
            }
            if let Some(long) = c
                .changes
                .iter()
                .find(|n| n.len() > limits.max_message_bytes)
            {
                return Err(too_big("change note", long.len(), limits.max_message_bytes));
            }
            sanitize::Sanitized::Cleaned {
                text: c.text,
                changes: c.changes,
            }
        }
    })
}

/// Breaker state into the guest.
pub fn breaker_in(b: &breaker::Breaker) -> wit::Breaker {
    wit::Breaker {
        state: match b.state {
            breaker::State::Closed => wit::BreakerState::Closed,
            breaker::State::Open => wit::BreakerState::Open,
            breaker::State::HalfOpen => wit::BreakerState::HalfOpen,
            breaker::State::ForcedOpen => wit::BreakerState::ForcedOpen,
        },
        buckets: b
            .buckets
            .iter()
            .map(|k| wit::Bucket {
                start_ms: k.start_ms,
                calls: k.calls,
                failures: k.failures,
                slow: k.slow,
            })
            .collect(),
        opened_at_ms: b.opened_at_ms,
        half_open_since_ms: b.half_open_since_ms,
        half_open_admitted: b.half_open_admitted,
        half_open_calls: b.half_open_calls,
        half_open_failures: b.half_open_failures,
        half_open_slow: b.half_open_slow,
    }
}

/// Breaker state out of the guest, size-checked.
pub fn breaker_out(b: wit::Breaker, limits: &OutputLimits) -> Result<breaker::Breaker, CallError> {
    if b.buckets.len() > limits.max_buckets {
        return Err(CallError::Output(format!(
            "returned {} breaker buckets; the limit is {}",
            b.buckets.len(),
            limits.max_buckets
        )));
    }
    Ok(breaker::Breaker {
        state: match b.state {
            wit::BreakerState::Closed => breaker::State::Closed,
            wit::BreakerState::Open => breaker::State::Open,
            wit::BreakerState::HalfOpen => breaker::State::HalfOpen,
            wit::BreakerState::ForcedOpen => breaker::State::ForcedOpen,
        },
        buckets: b
            .buckets
            .into_iter()
            .map(|k| breaker::Bucket {
                start_ms: k.start_ms,
                calls: k.calls,
                failures: k.failures,
                slow: k.slow,
            })
            .collect(),
        opened_at_ms: b.opened_at_ms,
        half_open_since_ms: b.half_open_since_ms,
        half_open_admitted: b.half_open_admitted,
        half_open_calls: b.half_open_calls,
        half_open_failures: b.half_open_failures,
        half_open_slow: b.half_open_slow,
    })
}

/// An admission decision out of the guest.
pub fn admission(a: wit::Admission) -> breaker::Admission {
    match a {
        wit::Admission::Allow => breaker::Admission::Allow,
        wit::Admission::Reject(ms) => breaker::Admission::Reject { retry_after_ms: ms },
    }
}

/// A call result into the guest.
pub fn call_result(c: &breaker::CallResult) -> wit::CallResult {
    wit::CallResult {
        outcome: match c.outcome {
            breaker::Outcome::Success => wit::Outcome::Success,
            breaker::Outcome::Failure => wit::Outcome::Failure,
            breaker::Outcome::Ignored => wit::Outcome::Ignored,
        },
        duration_ms: c.duration_ms,
    }
}

/// A failed attempt into the guest.
pub fn attempt(a: &retry::Attempt) -> wit::Attempt {
    wit::Attempt {
        number: a.number,
        kind: match a.kind {
            retry::ErrorKind::Timeout => wit::ErrorKind::Timeout,
            retry::ErrorKind::Connection => wit::ErrorKind::Connection,
            retry::ErrorKind::RateLimited => wit::ErrorKind::RateLimited,
            retry::ErrorKind::ServerError => wit::ErrorKind::ServerError,
            retry::ErrorKind::ClientError => wit::ErrorKind::ClientError,
            retry::ErrorKind::OutOfMemory => wit::ErrorKind::OutOfMemory,
        },
        status: a.status,
        retry_after_ms: a.retry_after_ms,
        elapsed_ms: a.elapsed_ms,
        previous_delay_ms: a.previous_delay_ms,
    }
}

/// A retry decision out of the guest.
pub fn retry_decision(d: wit::RetryDecision) -> retry::RetryDecision {
    match d {
        wit::RetryDecision::RetryAfter(ms) => retry::RetryDecision::RetryAfter(ms),
        wit::RetryDecision::GiveUp(r) => retry::RetryDecision::GiveUp(match r {
            wit::GiveUpReason::AttemptsExhausted => retry::GiveUpReason::AttemptsExhausted,
            wit::GiveUpReason::NonRetryable => retry::GiveUpReason::NonRetryable,
            wit::GiveUpReason::DeadlineExceeded => retry::GiveUpReason::DeadlineExceeded,
            wit::GiveUpReason::RetryAfterTooLong => retry::GiveUpReason::RetryAfterTooLong,
        }),
    }
}
