//! Retry decisions as a pure function: exponential backoff with jitter, attempt and time
//! budgets, and `Retry-After` handling. Randomness comes from the host as a parameter so the
//! decision is deterministic and testable.

use serde::{Deserialize, Serialize};

/// Why a call failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The call took too long.
    Timeout,
    /// The connection could not be made or broke.
    Connection,
    /// The backend asked us to slow down (HTTP 429).
    RateLimited,
    /// The backend failed (HTTP 5xx).
    ServerError,
    /// The request itself was wrong (HTTP 4xx): retrying the same request cannot help.
    ClientError,
    /// The backend ran out of memory.
    OutOfMemory,
}

/// How randomness spreads retry delays, so that many clients failing together do not retry
/// in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Exactly the exponential delay.
    None,
    /// Uniform in `[0, delay)`.
    Full,
    /// Uniform in `[delay/2, delay)`.
    Equal,
    /// AWS "decorrelated jitter": grows from the previous delay instead of the attempt number.
    Decorrelated,
}

/// Retry policy; operators tune it per backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, including the first (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the first retry, before jitter.
    pub initial_delay_ms: u64,
    /// Growth factor of the delay per attempt (>= 1, finite).
    pub multiplier: f64,
    /// Cap on the computed delay.
    pub max_delay_ms: u64,
    /// How delays are randomised.
    pub jitter: Jitter,
    /// Total time budget since the first attempt; a retry that would end later is not
    /// made. 0 = unlimited.
    pub max_elapsed_ms: u64,
    /// Error kinds that are never retried.
    pub non_retryable: Vec<ErrorKind>,
    /// Whether a server's `Retry-After` sets a floor on the delay.
    pub honour_retry_after: bool,
    /// Longest `Retry-After` worth waiting for; longer ones give up at once.
    pub max_retry_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_delay_ms: 200,
            multiplier: 2.0,
            max_delay_ms: 10_000,
            jitter: Jitter::Full,
            max_elapsed_ms: 60_000,
            non_retryable: vec![ErrorKind::ClientError],
            honour_retry_after: true,
            max_retry_after_ms: 60_000,
        }
    }
}

impl RetryConfig {
    /// Refuses settings that make no sense, so they fail at load time.
    pub fn check(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be >= 1".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err("multiplier must be a finite number >= 1".into());
        }
        if self.max_delay_ms < self.initial_delay_ms {
            return Err("max_delay_ms must be >= initial_delay_ms".into());
        }
        Ok(())
    }
}

/// The attempt that just failed, as the host saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based number of the attempt that just failed.
    pub number: u32,
    /// What went wrong.
    pub kind: ErrorKind,
    /// HTTP status, when there was one.
    pub status: Option<u16>,
    /// The server's `Retry-After`, in milliseconds, when it sent one.
    pub retry_after_ms: Option<u64>,
    /// Time since the first attempt started.
    pub elapsed_ms: u64,
    /// The delay chosen before this attempt (0 before the first); decorrelated jitter grows
    /// from it.
    pub previous_delay_ms: u64,
}

/// Why no further attempt will be made; reported to clients and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GiveUpReason {
    /// `max_attempts` reached.
    AttemptsExhausted,
    /// The error kind is in `non_retryable`.
    NonRetryable,
    /// Waiting would end past `max_elapsed_ms`.
    DeadlineExceeded,
    /// The server asked us to wait longer than `max_retry_after_ms`.
    RetryAfterTooLong,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryDecision {
    /// Stop and report the failure.
    GiveUp(GiveUpReason),
    /// Wait this many milliseconds, then try again.
    RetryAfter(u64),
}

/// Decides whether and when to retry after `attempt` failed. `jitter` is a random number in
/// `[0, 1)` from the host (clamped; NaN counts as 0). An HTTP 429 counts as
/// [`ErrorKind::RateLimited`] whatever `kind` says, so rate limiting stays retryable even when
/// client errors are not.
pub fn decide(attempt: &Attempt, jitter: f64, cfg: &RetryConfig) -> RetryDecision {
    let kind = if attempt.status == Some(429) {
        ErrorKind::RateLimited
    } else {
        attempt.kind
    };
    if cfg.non_retryable.contains(&kind) {
        return RetryDecision::GiveUp(GiveUpReason::NonRetryable);
    }
    if attempt.number >= cfg.max_attempts.max(1) {
        return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted);
    }
    let j = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let (initial, max) = (cfg.initial_delay_ms as f64, cfg.max_delay_ms as f64);
    let multiplier = if cfg.multiplier >= 1.0 {
        cfg.multiplier
    } else {
        1.0
    }; // NaN too
    // Exponents past ~1100 overflow f64 to infinity anyway; clamping keeps powi's argument sane.
    let exponent = attempt.number.saturating_sub(1).min(2048) as i32;
    let base = (initial * multiplier.powi(exponent)).min(max);
    let delay = match cfg.jitter {
        Jitter::None => base,
        Jitter::Full => j * base,
        Jitter::Equal => base / 2.0 + j * base / 2.0,
        Jitter::Decorrelated => {
            let previous = (attempt.previous_delay_ms as f64).max(initial);
            (initial + j * (3.0 * previous - initial)).min(max)
        }
    };
    // `as` saturates (NaN becomes 0), so no float can overflow the delay.
    let mut delay = delay as u64;
    if let Some(retry_after) = attempt.retry_after_ms.filter(|_| cfg.honour_retry_after) {
        if retry_after > cfg.max_retry_after_ms {
            return RetryDecision::GiveUp(GiveUpReason::RetryAfterTooLong);
        }
        delay = delay.max(retry_after);
    }
    if cfg.max_elapsed_ms > 0 && attempt.elapsed_ms.saturating_add(delay) > cfg.max_elapsed_ms {
        return RetryDecision::GiveUp(GiveUpReason::DeadlineExceeded);
    }
    RetryDecision::RetryAfter(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RetryDecision::{GiveUp, RetryAfter};

    fn attempt(number: u32, kind: ErrorKind) -> Attempt {
        Attempt {
            number,
            kind,
            status: None,
            retry_after_ms: None,
            elapsed_ms: 0,
            previous_delay_ms: 0,
        }
    }

    fn cfg(jitter: Jitter) -> RetryConfig {
        RetryConfig {
            jitter,
            ..Default::default()
        }
    }

    fn delay(d: RetryDecision) -> u64 {
        match d {
            RetryAfter(ms) => ms,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn attempts_exhausted() {
        let c = cfg(Jitter::None);
        assert_eq!(
            decide(&attempt(3, ErrorKind::Timeout), 0.5, &c),
            RetryAfter(800)
        );
        assert_eq!(
            decide(&attempt(4, ErrorKind::Timeout), 0.5, &c),
            GiveUp(GiveUpReason::AttemptsExhausted)
        );
        assert_eq!(
            decide(&attempt(u32::MAX, ErrorKind::Timeout), 0.5, &c),
            GiveUp(GiveUpReason::AttemptsExhausted)
        );
        let once = RetryConfig {
            max_attempts: 1,
            ..c
        };
        assert_eq!(
            decide(&attempt(1, ErrorKind::Timeout), 0.5, &once),
            GiveUp(GiveUpReason::AttemptsExhausted)
        );
    }

    #[test]
    fn non_retryable_kinds() {
        let c = RetryConfig::default();
        assert_eq!(
            decide(&attempt(1, ErrorKind::ClientError), 0.5, &c),
            GiveUp(GiveUpReason::NonRetryable)
        );
        // Non-retryable wins over exhaustion: it is the more useful reason.
        assert_eq!(
            decide(&attempt(9, ErrorKind::ClientError), 0.5, &c),
            GiveUp(GiveUpReason::NonRetryable)
        );
        let c2 = RetryConfig {
            non_retryable: vec![ErrorKind::OutOfMemory],
            ..c.clone()
        };
        assert_eq!(
            decide(&attempt(1, ErrorKind::OutOfMemory), 0.5, &c2),
            GiveUp(GiveUpReason::NonRetryable)
        );
        assert!(matches!(
            decide(&attempt(1, ErrorKind::ClientError), 0.5, &c2),
            RetryAfter(_)
        ));
        // A 429 is rate limiting even when reported as a client error.
        let a = Attempt {
            status: Some(429),
            ..attempt(1, ErrorKind::ClientError)
        };
        assert!(matches!(decide(&a, 0.5, &c), RetryAfter(_)));
        let limited = RetryConfig {
            non_retryable: vec![ErrorKind::RateLimited],
            ..c
        };
        assert_eq!(
            decide(&a, 0.5, &limited),
            GiveUp(GiveUpReason::NonRetryable)
        );
    }

    #[test]
    fn exponential_base_is_capped_without_overflow() {
        let c = RetryConfig {
            max_attempts: u32::MAX,
            max_elapsed_ms: 0,
            ..cfg(Jitter::None)
        };
        let got: Vec<u64> = (1..=8)
            .map(|n| delay(decide(&attempt(n, ErrorKind::ServerError), 0.0, &c)))
            .collect();
        assert_eq!(got, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(
            delay(decide(&attempt(u32::MAX - 1, ErrorKind::Timeout), 0.0, &c)),
            10_000
        );
        let huge = RetryConfig {
            multiplier: f64::MAX,
            initial_delay_ms: u64::MAX,
            max_delay_ms: u64::MAX,
            ..c.clone()
        };
        assert_eq!(
            delay(decide(&attempt(5, ErrorKind::Timeout), 0.0, &huge)),
            u64::MAX
        );
        // Unchecked nonsense multipliers behave as 1.
        for m in [f64::NAN, 0.5, -2.0] {
            let bad = RetryConfig {
                multiplier: m,
                ..c.clone()
            };
            assert_eq!(
                delay(decide(&attempt(5, ErrorKind::Timeout), 0.0, &bad)),
                200
            );
        }
        let flat = RetryConfig {
            multiplier: 1.0,
            ..c
        };
        assert_eq!(
            delay(decide(&attempt(7, ErrorKind::Timeout), 0.0, &flat)),
            200
        );
    }

    #[test]
    fn full_jitter_bounds() {
        let c = cfg(Jitter::Full);
        let a = attempt(2, ErrorKind::Connection); // base 400
        assert_eq!(delay(decide(&a, 0.0, &c)), 0);
        assert_eq!(delay(decide(&a, 0.5, &c)), 200);
        assert_eq!(delay(decide(&a, 0.999_999, &c)), 399);
        for j in 0..100 {
            assert!(delay(decide(&a, f64::from(j) / 100.0, &c)) < 400);
        }
    }

    #[test]
    fn equal_jitter_bounds() {
        let c = cfg(Jitter::Equal);
        let a = attempt(3, ErrorKind::Timeout); // base 800
        assert_eq!(delay(decide(&a, 0.0, &c)), 400);
        assert_eq!(delay(decide(&a, 0.5, &c)), 600);
        for j in 0..100 {
            let d = delay(decide(&a, f64::from(j) / 100.0, &c));
            assert!((400..800).contains(&d), "{d}");
        }
    }

    #[test]
    fn decorrelated_jitter() {
        let c = cfg(Jitter::Decorrelated);
        let a = attempt(1, ErrorKind::Timeout);
        // previous 0 counts as initial: 200 + j * (600 - 200).
        assert_eq!(delay(decide(&a, 0.0, &c)), 200);
        assert_eq!(delay(decide(&a, 0.5, &c)), 400);
        let a = Attempt {
            previous_delay_ms: 1000,
            ..attempt(2, ErrorKind::Timeout)
        };
        assert_eq!(delay(decide(&a, 0.5, &c)), 200 + 1400);
        let a = Attempt {
            previous_delay_ms: 9000,
            ..attempt(3, ErrorKind::Timeout)
        };
        assert_eq!(delay(decide(&a, 0.9, &c)), 10_000);
        let a = Attempt {
            previous_delay_ms: u64::MAX,
            ..attempt(3, ErrorKind::Timeout)
        };
        assert_eq!(delay(decide(&a, 0.5, &c)), 10_000);
    }

    #[test]
    fn jitter_input_is_clamped() {
        let c = cfg(Jitter::Full);
        let a = attempt(1, ErrorKind::Timeout);
        assert_eq!(delay(decide(&a, f64::NAN, &c)), 0);
        assert_eq!(delay(decide(&a, -5.0, &c)), 0);
        assert_eq!(delay(decide(&a, f64::NEG_INFINITY, &c)), 0);
        assert_eq!(delay(decide(&a, 7.0, &c)), 200);
        assert_eq!(delay(decide(&a, f64::INFINITY, &c)), 200);
    }

    #[test]
    fn retry_after() {
        let c = cfg(Jitter::None);
        let a = Attempt {
            retry_after_ms: Some(5_000),
            ..attempt(1, ErrorKind::RateLimited)
        };
        assert_eq!(decide(&a, 0.5, &c), RetryAfter(5_000));
        // A shorter Retry-After does not shorten the backoff.
        let short = Attempt {
            retry_after_ms: Some(50),
            ..a.clone()
        };
        assert_eq!(decide(&short, 0.5, &c), RetryAfter(200));
        // It also applies to other kinds (e.g. a 503 with Retry-After) and to 429 statuses.
        let server = Attempt {
            kind: ErrorKind::ServerError,
            status: Some(503),
            ..a.clone()
        };
        assert_eq!(decide(&server, 0.5, &c), RetryAfter(5_000));
        let too_long = Attempt {
            retry_after_ms: Some(60_001),
            ..a.clone()
        };
        assert_eq!(
            decide(&too_long, 0.5, &c),
            GiveUp(GiveUpReason::RetryAfterTooLong)
        );
        let at_limit = Attempt {
            retry_after_ms: Some(60_000),
            ..a.clone()
        };
        let unlimited = RetryConfig {
            max_elapsed_ms: 0,
            ..c.clone()
        };
        assert_eq!(decide(&at_limit, 0.5, &unlimited), RetryAfter(60_000));
        let ignore = RetryConfig {
            honour_retry_after: false,
            ..c
        };
        assert_eq!(decide(&too_long, 0.5, &ignore), RetryAfter(200));
    }

    #[test]
    fn elapsed_deadline() {
        let c = cfg(Jitter::None);
        let a = Attempt {
            elapsed_ms: 59_800,
            ..attempt(1, ErrorKind::Timeout)
        };
        assert_eq!(decide(&a, 0.0, &c), RetryAfter(200));
        let a = Attempt {
            elapsed_ms: 59_801,
            ..a
        };
        assert_eq!(decide(&a, 0.0, &c), GiveUp(GiveUpReason::DeadlineExceeded));
        // Retry-After can push past the deadline too.
        let ra = Attempt {
            elapsed_ms: 50_000,
            retry_after_ms: Some(20_000),
            ..attempt(1, ErrorKind::RateLimited)
        };
        assert_eq!(decide(&ra, 0.0, &c), GiveUp(GiveUpReason::DeadlineExceeded));
        // 0 means unlimited; saturating even at the extreme.
        let unlimited = RetryConfig {
            max_elapsed_ms: 0,
            ..c.clone()
        };
        let late = Attempt {
            elapsed_ms: u64::MAX,
            ..attempt(1, ErrorKind::Timeout)
        };
        assert_eq!(decide(&late, 0.0, &unlimited), RetryAfter(200));
        assert_eq!(
            decide(&late, 0.0, &c),
            GiveUp(GiveUpReason::DeadlineExceeded)
        );
    }

    #[test]
    fn config_check_and_serde() {
        assert_eq!(RetryConfig::default().check(), Ok(()));
        type Mutate = fn(&mut RetryConfig);
        let cases: [(Mutate, &str); 5] = [
            (|c| c.max_attempts = 0, "max_attempts"),
            (|c| c.multiplier = 0.9, "multiplier"),
            (|c| c.multiplier = f64::NAN, "multiplier"),
            (|c| c.multiplier = f64::INFINITY, "multiplier"),
            (
                |c| c.max_delay_ms = 100,
                "max_delay_ms must be >= initial_delay_ms",
            ),
        ];
        for (mutate, want) in cases {
            let mut c = RetryConfig::default();
            mutate(&mut c);
            let got = c.check().unwrap_err();
            assert!(got.contains(want), "{got} should mention {want}");
        }
        let c: RetryConfig = serde_json::from_str(
            r#"{"jitter":"decorrelated","non_retryable":["client_error","out_of_memory"]}"#,
        )
        .unwrap();
        assert_eq!(
            (c.jitter, c.non_retryable.len(), c.max_attempts),
            (Jitter::Decorrelated, 2, 4)
        );
        assert!(serde_json::from_str::<RetryConfig>(r#"{"retries":3}"#).is_err());
        assert_eq!(
            serde_json::to_string(&GiveUp(GiveUpReason::RetryAfterTooLong)).unwrap(),
            r#"{"give_up":"retry_after_too_long"}"#
        );
        assert_eq!(
            serde_json::to_string(&RetryAfter(5)).unwrap(),
            r#"{"retry_after":5}"#
        );
        let a = Attempt {
            status: Some(503),
            retry_after_ms: Some(1),
            ..attempt(2, ErrorKind::ServerError)
        };
        let back: Attempt = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }
}
