//! Conversions between the plain [`crate::rules`] types and the generated WIT types.

use super::decisions as wit;
use super::sanitization::{CleanedPrompt, Sanitized};
use super::{FieldError, GenerationRequest};
use crate::rules::{breaker, request, retry, sanitize};

impl From<request::FieldError> for FieldError {
    fn from(e: request::FieldError) -> Self {
        Self {
            field: e.field,
            code: e.code,
            message: e.message,
        }
    }
}

impl From<request::Request> for GenerationRequest {
    fn from(r: request::Request) -> Self {
        Self {
            prompt: r.prompt,
            user_id: r.user_id,
            width: r.width,
            height: r.height,
            num_images: r.num_images,
            steps: r.steps,
            guidance: r.guidance,
            seed: r.seed,
            style: r.style,
        }
    }
}

impl From<sanitize::Sanitized> for Sanitized {
    fn from(s: sanitize::Sanitized) -> Self {
        match s {
            sanitize::Sanitized::Unchanged => Sanitized::Unchanged,
            sanitize::Sanitized::Cleaned { text, changes } => {
                Sanitized::Cleaned(CleanedPrompt { text, changes })
            }
            sanitize::Sanitized::Reject(e) => Sanitized::Reject(e.into()),
        }
    }
}

impl From<wit::BreakerState> for breaker::State {
    fn from(s: wit::BreakerState) -> Self {
        match s {
            wit::BreakerState::Closed => Self::Closed,
            wit::BreakerState::Open => Self::Open,
            wit::BreakerState::HalfOpen => Self::HalfOpen,
            wit::BreakerState::ForcedOpen => Self::ForcedOpen,
        }
    }
}

impl From<breaker::State> for wit::BreakerState {
    fn from(s: breaker::State) -> Self {
        match s {
            breaker::State::Closed => Self::Closed,
            breaker::State::Open => Self::Open,
            breaker::State::HalfOpen => Self::HalfOpen,
            breaker::State::ForcedOpen => Self::ForcedOpen,
        }
    }
}

impl From<wit::Breaker> for breaker::Breaker {
    fn from(b: wit::Breaker) -> Self {
        Self {
            state: b.state.into(),
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
        }
    }
}

impl From<breaker::Breaker> for wit::Breaker {
    fn from(b: breaker::Breaker) -> Self {
        Self {
            state: b.state.into(),
            buckets: b
                .buckets
                .into_iter()
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
}

impl From<wit::CallResult> for breaker::CallResult {
    fn from(c: wit::CallResult) -> Self {
        Self {
            outcome: match c.outcome {
                wit::Outcome::Success => breaker::Outcome::Success,
                wit::Outcome::Failure => breaker::Outcome::Failure,
                wit::Outcome::Ignored => breaker::Outcome::Ignored,
            },
            duration_ms: c.duration_ms,
        }
    }
}

impl From<breaker::Admission> for wit::Admission {
    fn from(a: breaker::Admission) -> Self {
        match a {
            breaker::Admission::Allow => Self::Allow,
            breaker::Admission::Reject { retry_after_ms } => Self::Reject(retry_after_ms),
        }
    }
}

impl From<wit::Attempt> for retry::Attempt {
    fn from(a: wit::Attempt) -> Self {
        Self {
            number: a.number,
            kind: match a.kind {
                wit::ErrorKind::Timeout => retry::ErrorKind::Timeout,
                wit::ErrorKind::Connection => retry::ErrorKind::Connection,
                wit::ErrorKind::RateLimited => retry::ErrorKind::RateLimited,
                wit::ErrorKind::ServerError => retry::ErrorKind::ServerError,
                wit::ErrorKind::ClientError => retry::ErrorKind::ClientError,
                wit::ErrorKind::OutOfMemory => retry::ErrorKind::OutOfMemory,
            },
            status: a.status,
            retry_after_ms: a.retry_after_ms,
            elapsed_ms: a.elapsed_ms,
            previous_delay_ms: a.previous_delay_ms,
        }
    }
}

impl From<retry::RetryDecision> for wit::RetryDecision {
    fn from(d: retry::RetryDecision) -> Self {
        match d {
            retry::RetryDecision::RetryAfter(ms) => Self::RetryAfter(ms),
            retry::RetryDecision::GiveUp(reason) => Self::GiveUp(match reason {
                retry::GiveUpReason::AttemptsExhausted => wit::GiveUpReason::AttemptsExhausted,
                retry::GiveUpReason::NonRetryable => wit::GiveUpReason::NonRetryable,
                retry::GiveUpReason::DeadlineExceeded => wit::GiveUpReason::DeadlineExceeded,
                retry::GiveUpReason::RetryAfterTooLong => wit::GiveUpReason::RetryAfterTooLong,
            }),
        }
    }
}
