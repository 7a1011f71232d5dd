//! The one error taxonomy every surface reports: a category with a fixed retryability and
//! HTTP status, and the seed's `ErrorResponse` body `{error_type, message, details,
//! timestamp}`.

use serde::{Deserialize, Serialize};

/// Error categories (DESIGN §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request is wrong; fix it.
    ValidationError,
    /// A policy failed (trap, limit) under a fail-closed slot.
    PolicyError,
    /// Not enough memory, queue space or time right now.
    ResourceExhausted,
    /// A dependency's circuit breaker is open.
    CircuitOpen,
    /// The worker is not set up (model, storage, settings).
    InitializationError,
    /// The model failed.
    GenerationError,
    /// Images could not be stored.
    StorageError,
    /// A deadline passed.
    Timeout,
    /// Cancelled by a client.
    Cancelled,
    /// A bug or an unexpected state.
    Internal,
}

impl ErrorType {
    /// Whether the same request may succeed later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::ResourceExhausted
                | Self::CircuitOpen
                | Self::StorageError
                | Self::Timeout
                | Self::InitializationError
        )
    }

    /// HTTP status when the error answers a request directly.
    pub fn http_status(self) -> u16 {
        match self {
            Self::ValidationError => 422,
            Self::PolicyError => 500,
            Self::ResourceExhausted | Self::CircuitOpen | Self::InitializationError => 503,
            Self::GenerationError | Self::Internal => 500,
            Self::StorageError => 502,
            Self::Timeout => 504,
            Self::Cancelled => 409,
        }
    }

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ValidationError => "validation_error",
            Self::PolicyError => "policy_error",
            Self::ResourceExhausted => "resource_exhausted",
            Self::CircuitOpen => "circuit_open",
            Self::InitializationError => "initialization_error",
            Self::GenerationError => "generation_error",
            Self::StorageError => "storage_error",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Internal => "internal",
        }
    }
}

/// The error body of every API and of failed jobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Category.
    pub error_type: ErrorType,
    /// One human sentence.
    pub message: String,
    /// Structured specifics (field errors, paths, retry-after, policy hash).
    pub details: serde_json::Value,
    /// RFC 3339 UTC.
    pub timestamp: String,
    /// Whether retrying the same request may succeed.
    pub retryable: bool,
}

impl ErrorResponse {
    /// A response of `error_type` with `message` and `details`.
    pub fn new(
        error_type: ErrorType,
        message: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            error_type,
            message: message.into(),
            details,
            timestamp: rfc3339_now(),
            retryable: error_type.retryable(),
        }
    }

    /// A validation error carrying field errors.
    pub fn validation(
        message: impl Into<String>,
        fields: &[headshot_plugin_sdk::rules::request::FieldError],
    ) -> Self {
        Self::new(
            ErrorType::ValidationError,
            message,
            serde_json::json!({ "fields": fields }),
        )
    }
}

/// Current UTC time as RFC 3339 with milliseconds.
pub fn rfc3339_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    rfc3339(ms)
}

/// `ms` since the Unix epoch as RFC 3339 UTC.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_737_600_123), "2026-11-27T00:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn categories_have_fixed_status_and_retryability() {
        let e = ErrorResponse::new(ErrorType::StorageError, "down", serde_json::json!({}));
        assert!(e.retryable);
        assert_eq!(ErrorType::ValidationError.http_status(), 422);
        assert!(!ErrorType::ValidationError.retryable());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["error_type"], "storage_error");
    }
}
