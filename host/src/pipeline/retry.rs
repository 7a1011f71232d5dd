//! Retrying model loads whose failures look transient, with exponential backoff.

use std::time::Duration;

use super::error::LoadError;

/// Longest single wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs `f` up to `attempts` times while it fails transiently, sleeping `backoff`, `2×backoff`,
/// … (capped at 30 s) in between. A permanent failure (missing or corrupt file) returns at once.
pub fn retry_transient<T>(
    attempts: u32,
    backoff: Duration,
    mut f: impl FnMut(u32) -> Result<T, LoadError>,
) -> Result<T, LoadError> {
    let attempts = attempts.max(1);
    let mut wait = backoff;
    let mut attempt = 1;
    loop {
        match f(attempt) {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < attempts => {
                tracing::warn!(attempt, attempts, wait_ms = wait.as_millis() as u64, error = %e, "model load failed; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn transient() -> LoadError {
        LoadError::Io {
            file: PathBuf::from("x"),
            source: std::io::Error::from(std::io::ErrorKind::TimedOut),
        }
    }

    #[test]
    fn retries_transient_then_succeeds() {
        let mut calls = 0;
        let r = retry_transient(4, Duration::from_millis(1), |_| {
            calls += 1;
            if calls < 3 {
                Err(transient())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);
    }

    #[test]
    fn gives_up_after_the_last_attempt() {
        let mut calls = 0;
        let r: Result<(), _> = retry_transient(2, Duration::from_millis(1), |_| {
            calls += 1;
            Err(transient())
        });
        assert!(r.is_err());
        assert_eq!(calls, 2);
    }

    #[test]
    fn permanent_failures_fail_fast() {
        let mut calls = 0;
        let r: Result<(), _> = retry_transient(5, Duration::from_millis(1), |_| {
            calls += 1;
            Err(LoadError::Missing {
                file: "ae.safetensors".into(),
                expected: "the autoencoder".into(),
            })
        });
        assert!(r.unwrap_err().to_string().contains("ae.safetensors"));
        assert_eq!(calls, 1);
    }
}
