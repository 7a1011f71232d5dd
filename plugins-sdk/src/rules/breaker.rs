//! Circuit breaker with resilience4j semantics, as pure functions.
//!
//! State goes in and comes out and time is a parameter, so the host can keep the state
//! wherever it likes (and a guest can be stateless). Stops hammering a failing backend: after
//! too many failed or slow calls the breaker opens and rejects calls for a while, then lets a
//! few trial calls through (half-open) to decide whether to close again.
//!
//! State passed in is treated as untrusted: oversized windows are trimmed, counters are
//! clamped, and all arithmetic saturates, so a hostile or stale state (or a clock going
//! backwards) can never panic or overflow.

use serde::{Deserialize, Serialize};

/// How the failure rate's window is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowType {
    /// The last `window_size` calls.
    #[default]
    CountBased,
    /// The calls of the last `window_size` seconds.
    TimeBased,
}

/// Largest window accepted: bounds the state's size.
const MAX_WINDOW: u32 = 10_000;

/// Tuning for the breaker (resilience4j's names and defaults), so operators can adapt it to
/// each backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Whether `window_size` counts calls or seconds.
    pub window_type: WindowType,
    /// Window length: calls (count-based) or seconds (time-based), 1..=10000.
    pub window_size: u32,
    /// Calls needed in the window before rates are judged, so one early failure cannot trip it.
    pub minimum_calls: u32,
    /// Failure percentage, in (0, 100], at or above which the breaker opens.
    pub failure_rate_threshold: f32,
    /// Slow-call percentage, in (0, 100], at or above which the breaker opens.
    pub slow_call_rate_threshold: f32,
    /// A call taking at least this long counts as slow.
    pub slow_call_duration_ms: u64,
    /// How long the breaker stays open before trying calls again.
    pub wait_in_open_ms: u64,
    /// Trial calls admitted while half-open; their outcome decides whether to close.
    pub permitted_calls_in_half_open: u32,
    /// Longest time to stay half-open waiting for the trial calls before opening again;
    /// 0 waits for them indefinitely.
    pub max_wait_in_half_open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window_type: WindowType::CountBased,
            window_size: 100,
            minimum_calls: 10,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration_ms: 60_000,
            wait_in_open_ms: 30_000,
            permitted_calls_in_half_open: 3,
            max_wait_in_half_open_ms: 0,
        }
    }
}

impl BreakerConfig {
    /// Refuses settings under which the breaker could never work as intended.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_WINDOW).contains(&self.window_size) {
            return Err(format!("window_size must be between 1 and {MAX_WINDOW}"));
        }
        if self.minimum_calls == 0 {
            return Err("minimum_calls must be >= 1".into());
        }
        if self.window_type == WindowType::CountBased && self.minimum_calls > self.window_size {
            return Err("minimum_calls must be <= window_size for a count-based window".into());
        }
        for (key, v) in [
            ("failure_rate_threshold", self.failure_rate_threshold),
            ("slow_call_rate_threshold", self.slow_call_rate_threshold),
        ] {
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("{key} must be > 0 and <= 100"));
            }
        }
        if self.slow_call_duration_ms == 0 {
            return Err("slow_call_duration_ms must be >= 1".into());
        }
        if self.wait_in_open_ms == 0 {
            return Err("wait_in_open_ms must be >= 1".into());
        }
        if self.permitted_calls_in_half_open == 0 {
            return Err("permitted_calls_in_half_open must be >= 1".into());
        }
        Ok(())
    }

    fn window_len(&self) -> usize {
        self.window_size.clamp(1, MAX_WINDOW) as usize
    }

    fn permitted(&self) -> u32 {
        self.permitted_calls_in_half_open.max(1)
    }

    fn tripped(&self, calls: u64, failures: u64, slow: u64) -> bool {
        percent(failures, calls) >= f64::from(self.failure_rate_threshold)
            || percent(slow, calls) >= f64::from(self.slow_call_rate_threshold)
    }
}

/// The breaker's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Calls flow; outcomes are recorded in the window.
    #[default]
    Closed,
    /// Calls are rejected until `wait_in_open_ms` has passed.
    Open,
    /// A few trial calls are admitted to decide between closing and reopening.
    HalfOpen,
    /// Opened by an operator: rejects everything until [`reset`].
    ForcedOpen,
}

/// Aggregated outcomes of one slot of the window: one call (count-based) or one second
/// (time-based).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// When the slot started (the call's time, or the start of its second).
    pub start_ms: u64,
    /// Calls recorded.
    pub calls: u32,
    /// Of which failed.
    pub failures: u32,
    /// Of which were slow.
    pub slow: u32,
}

/// The whole breaker state, kept by the caller between calls.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Breaker {
    /// Current state.
    pub state: State,
    /// The closed-state window, oldest first.
    pub buckets: Vec<Bucket>,
    /// When the breaker last opened.
    pub opened_at_ms: u64,
    /// When the breaker became half-open.
    pub half_open_since_ms: u64,
    /// Trial calls admitted while half-open.
    pub half_open_admitted: u32,
    /// Trial calls recorded while half-open.
    pub half_open_calls: u32,
    /// Of which failed.
    pub half_open_failures: u32,
    /// Of which were slow.
    pub half_open_slow: u32,
}

/// How a call ended, as far as the breaker is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The call succeeded.
    Success,
    /// The call failed in a way that says something about the backend's health.
    Failure,
    /// The call should not count either way (e.g. the client cancelled it).
    Ignored,
}

/// A finished call to record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallResult {
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took; decides whether it was slow.
    pub duration_ms: u64,
}

/// Whether a call may go ahead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Make the call, then report it with [`record_outcome`].
    Allow,
    /// Do not call; trying again sooner than `retry_after_ms` is pointless.
    Reject {
        /// Suggested wait before the next attempt.
        retry_after_ms: u64,
    },
}

/// Decides whether a call may go ahead now; may move Open to HalfOpen or HalfOpen back to
/// Open, hence the new state.
pub fn admit(current: &Breaker, cfg: &BreakerConfig, now_ms: u64) -> (Admission, Breaker) {
    let wait = cfg.wait_in_open_ms;
    match current.state {
        State::Closed => (Admission::Allow, current.clone()),
        State::ForcedOpen => (
            Admission::Reject {
                retry_after_ms: wait,
            },
            current.clone(),
        ),
        State::Open => {
            // A clock that went backwards restarts the wait rather than prolonging it.
            let opened_at = current.opened_at_ms.min(now_ms);
            let elapsed = now_ms - opened_at;
            if elapsed < wait {
                let b = Breaker {
                    opened_at_ms: opened_at,
                    ..current.clone()
                };
                return (
                    Admission::Reject {
                        retry_after_ms: wait - elapsed,
                    },
                    b,
                );
            }
            let half = Breaker {
                state: State::HalfOpen,
                half_open_since_ms: now_ms,
                ..Breaker::default()
            };
            admit_half_open(half, cfg, now_ms)
        }
        State::HalfOpen => admit_half_open(current.clone(), cfg, now_ms),
    }
}

fn admit_half_open(mut b: Breaker, cfg: &BreakerConfig, now_ms: u64) -> (Admission, Breaker) {
    b.half_open_since_ms = b.half_open_since_ms.min(now_ms);
    let permitted = cfg.permitted();
    let max_wait = cfg.max_wait_in_half_open_ms;
    if max_wait > 0 && now_ms - b.half_open_since_ms >= max_wait && b.half_open_calls < permitted {
        return (
            Admission::Reject {
                retry_after_ms: cfg.wait_in_open_ms,
            },
            opened(now_ms),
        );
    }
    if b.half_open_admitted < permitted {
        b.half_open_admitted += 1;
        (Admission::Allow, b)
    } else {
        (
            Admission::Reject {
                retry_after_ms: 1000,
            },
            b,
        )
    }
}

/// Records a finished call and returns the new state (which may have opened or closed).
/// Ignored outcomes do not count; recording while (forced) open changes nothing.
pub fn record_outcome(
    current: &Breaker,
    cfg: &BreakerConfig,
    result: &CallResult,
    now_ms: u64,
) -> Breaker {
    let failed = u32::from(result.outcome == Outcome::Failure);
    let slow = u32::from(result.duration_ms >= cfg.slow_call_duration_ms);
    match (current.state, result.outcome) {
        (State::Open | State::ForcedOpen, _) | (State::Closed, Outcome::Ignored) => current.clone(),
        (State::HalfOpen, Outcome::Ignored) => {
            // Give the trial slot back so another call can decide.
            let admitted = current.half_open_admitted.saturating_sub(1);
            Breaker {
                half_open_admitted: admitted,
                ..current.clone()
            }
        }
        (State::Closed, _) => {
            let mut buckets = window(&current.buckets, cfg, now_ms);
            let current_second = now_ms - now_ms % 1000;
            match (cfg.window_type, buckets.last_mut()) {
                // Same second, or the clock went backwards: add to the newest slot.
                (WindowType::TimeBased, Some(last)) if last.start_ms >= current_second => {
                    last.calls = last.calls.saturating_add(1);
                    last.failures = last.failures.saturating_add(failed);
                    last.slow = last.slow.saturating_add(slow);
                }
                (window_type, _) => {
                    let start_ms = if window_type == WindowType::TimeBased {
                        current_second
                    } else {
                        now_ms
                    };
                    buckets.push(Bucket {
                        start_ms,
                        calls: 1,
                        failures: failed,
                        slow,
                    });
                    let excess = buckets.len().saturating_sub(cfg.window_len());
                    buckets.drain(..excess);
                }
            }
            let (calls, failures, slow) = totals(&buckets);
            if calls >= u64::from(cfg.minimum_calls.max(1)) && cfg.tripped(calls, failures, slow) {
                opened(now_ms)
            } else {
                Breaker {
                    buckets,
                    ..Breaker::default()
                }
            }
        }
        (State::HalfOpen, _) => {
            let mut b = current.clone();
            b.half_open_calls = b.half_open_calls.saturating_add(1);
            b.half_open_failures = b.half_open_failures.saturating_add(failed);
            b.half_open_slow = b.half_open_slow.saturating_add(slow);
            if b.half_open_calls < cfg.permitted() {
                return b;
            }
            let (calls, failures, slow) = half_open_totals(&b);
            if cfg.tripped(calls, failures, slow) {
                opened(now_ms)
            } else {
                Breaker::default()
            }
        }
    }
}

/// Opens the breaker until [`reset`], for operators taking a backend out of service;
/// idempotent (a forced-open breaker keeps its original time).
pub fn force_open(current: &Breaker, now_ms: u64) -> Breaker {
    if current.state == State::ForcedOpen {
        return current.clone();
    }
    Breaker {
        state: State::ForcedOpen,
        opened_at_ms: now_ms,
        ..Breaker::default()
    }
}

/// A closed breaker with an empty window: how operators undo [`force_open`] or clear history.
pub fn reset() -> Breaker {
    Breaker::default()
}

/// `(calls, failure rate %, slow-call rate %)` as the breaker sees them now, for metrics and
/// status pages: the half-open trial calls while half-open, else the window.
pub fn rates(b: &Breaker, cfg: &BreakerConfig, now_ms: u64) -> (u64, f32, f32) {
    let (calls, failures, slow) = match b.state {
        State::HalfOpen => half_open_totals(b),
        _ => totals(&window(&b.buckets, cfg, now_ms)),
    };
    (
        calls,
        percent(failures, calls) as f32,
        percent(slow, calls) as f32,
    )
}

fn opened(now_ms: u64) -> Breaker {
    Breaker {
        state: State::Open,
        opened_at_ms: now_ms,
        ..Breaker::default()
    }
}

/// In `f64`: an `f32` would round 99.9999% up to a tripping 100%.
fn percent(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 * 100.0 / total as f64
    }
}

/// The buckets still inside the window at `now_ms`, oldest first and at most `window_size`
/// of them. Time-based buckets more than a window away in either direction are dropped, so
/// stale state and wild clocks cannot keep old calls around.
fn window(buckets: &[Bucket], cfg: &BreakerConfig, now_ms: u64) -> Vec<Bucket> {
    let span = u64::from(cfg.window_size.clamp(1, MAX_WINDOW)) * 1000;
    let current_second = now_ms - now_ms % 1000;
    let in_window = |b: &&Bucket| {
        cfg.window_type == WindowType::CountBased || b.start_ms.abs_diff(current_second) < span
    };
    let mut kept: Vec<Bucket> = buckets
        .iter()
        .rev()
        .filter(in_window)
        .take(cfg.window_len())
        .cloned()
        .collect();
    kept.reverse();
    kept
}

/// `(calls, failures, slow)` summed in `u64` (no overflow) with each bucket's failure and slow
/// counts clamped to its calls, so hostile state cannot yield rates above 100%.
fn totals(buckets: &[Bucket]) -> (u64, u64, u64) {
    buckets.iter().fold((0, 0, 0), |(c, f, s), b| {
        let calls = u64::from(b.calls);
        (
            c + calls,
            f + calls.min(b.failures.into()),
            s + calls.min(b.slow.into()),
        )
    })
}

fn half_open_totals(b: &Breaker) -> (u64, u64, u64) {
    let calls = u64::from(b.half_open_calls);
    (
        calls,
        calls.min(b.half_open_failures.into()),
        calls.min(b.half_open_slow.into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: CallResult = CallResult {
        outcome: Outcome::Success,
        duration_ms: 10,
    };
    const FAIL: CallResult = CallResult {
        outcome: Outcome::Failure,
        duration_ms: 10,
    };
    const SLOW: CallResult = CallResult {
        outcome: Outcome::Success,
        duration_ms: 60_000,
    };
    const IGNORED: CallResult = CallResult {
        outcome: Outcome::Ignored,
        duration_ms: 10,
    };

    fn small() -> BreakerConfig {
        BreakerConfig {
            window_size: 4,
            minimum_calls: 4,
            ..Default::default()
        }
    }

    fn record_all(mut b: Breaker, cfg: &BreakerConfig, calls: &[CallResult], now: u64) -> Breaker {
        for c in calls {
            b = record_outcome(&b, cfg, c, now);
        }
        b
    }

    fn open_at(t: u64) -> Breaker {
        opened(t)
    }

    /// An open breaker moved to half-open by an admission at `t`.
    fn half_open(cfg: &BreakerConfig, t: u64) -> Breaker {
        let (a, b) = admit(&open_at(0), cfg, t);
        assert_eq!((a, b.state), (Admission::Allow, State::HalfOpen));
        b
    }

    #[test]
    fn closed_allows_and_trips_at_minimum_calls() {
        let cfg = BreakerConfig::default();
        let b = Breaker::default();
        assert_eq!(admit(&b, &cfg, 0), (Admission::Allow, b.clone()));
        let b = record_all(b, &cfg, &[FAIL; 9], 1);
        assert_eq!(b.state, State::Closed);
        assert_eq!(rates(&b, &cfg, 1), (9, 100.0, 0.0));
        let b = record_outcome(&b, &cfg, &FAIL, 5);
        assert_eq!(b, open_at(5));
        assert!(b.buckets.is_empty());
    }

    #[test]
    fn failure_threshold_is_inclusive() {
        let cfg = BreakerConfig {
            window_size: 10,
            ..Default::default()
        };
        let b = record_all(
            Breaker::default(),
            &cfg,
            &[OK, OK, OK, OK, OK, OK, FAIL, FAIL, FAIL, FAIL],
            0,
        );
        assert_eq!(
            (b.state, rates(&b, &cfg, 0)),
            (State::Closed, (10, 40.0, 0.0))
        );
        let b = record_all(
            Breaker::default(),
            &cfg,
            &[OK, OK, OK, OK, OK, FAIL, FAIL, FAIL, FAIL, FAIL],
            0,
        );
        assert_eq!(b.state, State::Open);
    }

    #[test]
    fn count_window_slides() {
        let cfg = small();
        let b = record_all(Breaker::default(), &cfg, &[FAIL, OK, OK, OK], 0);
        assert_eq!(
            (b.state, rates(&b, &cfg, 0)),
            (State::Closed, (4, 25.0, 0.0))
        );
        // The old failure slides out; two new ones make 2/4 = 50%.
        let b = record_all(b, &cfg, &[OK], 1);
        assert_eq!((b.buckets.len(), rates(&b, &cfg, 1)), (4, (4, 0.0, 0.0)));
        let b = record_all(b, &cfg, &[FAIL], 2);
        assert_eq!(b.state, State::Closed);
        let b = record_all(b, &cfg, &[FAIL], 3);
        assert_eq!(b, open_at(3));
    }

    #[test]
    fn slow_calls_and_ignored() {
        let cfg = small();
        let b = record_all(Breaker::default(), &cfg, &[SLOW, SLOW, SLOW], 0);
        assert_eq!(rates(&b, &cfg, 0), (3, 0.0, 100.0));
        assert_eq!(record_all(b.clone(), &cfg, &[OK], 0).state, State::Closed);
        assert_eq!(record_all(b.clone(), &cfg, &[SLOW], 0).state, State::Open);
        // Just under the slow duration is not slow.
        let fast = CallResult {
            duration_ms: 59_999,
            ..SLOW
        };
        assert_eq!(
            rates(&record_all(Breaker::default(), &cfg, &[fast], 0), &cfg, 0),
            (1, 0.0, 0.0)
        );
        // A failure can also be slow.
        let slow_fail = CallResult {
            outcome: Outcome::Failure,
            duration_ms: 70_000,
        };
        assert_eq!(
            rates(
                &record_all(Breaker::default(), &cfg, &[slow_fail], 0),
                &cfg,
                0
            ),
            (1, 100.0, 100.0)
        );
        // Ignored outcomes never count.
        let b2 = record_all(b.clone(), &cfg, &[IGNORED; 10], 0);
        assert_eq!(b2, b);
        let lower = BreakerConfig {
            slow_call_rate_threshold: 50.0,
            ..small()
        };
        let b = record_all(Breaker::default(), &lower, &[SLOW, SLOW, OK, OK], 0);
        assert_eq!(b.state, State::Open);
    }

    #[test]
    fn open_rejects_then_half_opens() {
        let cfg = BreakerConfig::default();
        let b = open_at(1_000);
        assert_eq!(
            admit(&b, &cfg, 1_000).0,
            Admission::Reject {
                retry_after_ms: 30_000
            }
        );
        assert_eq!(
            admit(&b, &cfg, 21_000),
            (
                Admission::Reject {
                    retry_after_ms: 10_000
                },
                b.clone()
            )
        );
        assert_eq!(
            admit(&b, &cfg, 30_999).0,
            Admission::Reject { retry_after_ms: 1 }
        );
        let (a, h) = admit(&b, &cfg, 31_000);
        assert_eq!(a, Admission::Allow);
        assert_eq!(
            (h.state, h.half_open_since_ms, h.half_open_admitted),
            (State::HalfOpen, 31_000, 1)
        );
        // Outcomes recorded while open are ignored.
        assert_eq!(record_outcome(&b, &cfg, &FAIL, 2_000), b);
    }

    #[test]
    fn half_open_admits_permitted_calls_only() {
        let cfg = BreakerConfig::default();
        let mut b = half_open(&cfg, 40_000);
        for _ in 0..2 {
            let (a, next) = admit(&b, &cfg, 40_001);
            assert_eq!(a, Admission::Allow);
            b = next;
        }
        assert_eq!(b.half_open_admitted, 3);
        let (a, b2) = admit(&b, &cfg, 40_002);
        assert_eq!(
            (a, b2),
            (
                Admission::Reject {
                    retry_after_ms: 1000
                },
                b.clone()
            )
        );
        // An ignored trial call gives its slot back.
        let b = record_outcome(&b, &cfg, &IGNORED, 40_003);
        assert_eq!((b.half_open_admitted, b.half_open_calls), (2, 0));
        assert_eq!(admit(&b, &cfg, 40_004).0, Admission::Allow);
    }

    #[test]
    fn half_open_closes_on_success() {
        let cfg = BreakerConfig::default();
        let b = record_all(half_open(&cfg, 30_000), &cfg, &[OK, FAIL], 30_100);
        assert_eq!(
            (b.state, rates(&b, &cfg, 30_100)),
            (State::HalfOpen, (2, 50.0, 0.0))
        );
        let closed = record_all(
            Breaker {
                state: State::HalfOpen,
                ..Breaker::default()
            },
            &cfg,
            &[OK, OK, OK],
            1,
        );
        assert_eq!(closed, Breaker::default());
        // 1 failure of 3 is 33% < 50%: closes with an empty window.
        let b = record_all(half_open(&cfg, 30_000), &cfg, &[OK, FAIL, OK], 30_100);
        assert_eq!(b, Breaker::default());
    }

    #[test]
    fn half_open_reopens_on_failures_or_slowness() {
        let cfg = BreakerConfig::default();
        let b = record_all(half_open(&cfg, 30_000), &cfg, &[FAIL, OK, FAIL], 30_500);
        assert_eq!(b, open_at(30_500));
        let b = record_all(half_open(&cfg, 30_000), &cfg, &[SLOW, SLOW, SLOW], 30_500);
        assert_eq!(b, open_at(30_500));
        // And it waits a full period again.
        assert_eq!(
            admit(&b, &cfg, 30_500).0,
            Admission::Reject {
                retry_after_ms: 30_000
            }
        );
    }

    #[test]
    fn half_open_max_wait() {
        let cfg = BreakerConfig {
            max_wait_in_half_open_ms: 5_000,
            ..Default::default()
        };
        let b = half_open(&cfg, 30_000);
        assert_eq!(admit(&b, &cfg, 34_999).0, Admission::Allow);
        let b = record_outcome(&b, &cfg, &OK, 31_000);
        let (a, b) = admit(&b, &cfg, 35_000);
        assert_eq!(
            (a, b),
            (
                Admission::Reject {
                    retry_after_ms: 30_000
                },
                open_at(35_000)
            )
        );
        // 0 waits forever.
        let cfg = BreakerConfig::default();
        assert_eq!(
            admit(&half_open(&cfg, 30_000), &cfg, u64::MAX).0,
            Admission::Allow
        );
    }

    #[test]
    fn forced_open_until_reset() {
        let cfg = BreakerConfig::default();
        let b = force_open(&record_all(Breaker::default(), &cfg, &[OK; 5], 0), 100);
        assert_eq!(
            (b.state, b.opened_at_ms, b.buckets.len()),
            (State::ForcedOpen, 100, 0)
        );
        assert_eq!(force_open(&b, 999), b);
        for t in [0, 100, 1_000_000, u64::MAX] {
            assert_eq!(
                admit(&b, &cfg, t),
                (
                    Admission::Reject {
                        retry_after_ms: 30_000
                    },
                    b.clone()
                )
            );
        }
        assert_eq!(record_outcome(&b, &cfg, &FAIL, 200), b);
        assert_eq!(reset(), Breaker::default());
        assert_eq!(admit(&reset(), &cfg, 0).0, Admission::Allow);
    }

    #[test]
    fn time_window() {
        let cfg = BreakerConfig {
            window_type: WindowType::TimeBased,
            window_size: 10,
            minimum_calls: 5,
            ..Default::default()
        };
        let b = record_all(Breaker::default(), &cfg, &[FAIL, FAIL], 1_500);
        assert_eq!(
            b.buckets,
            [Bucket {
                start_ms: 1_000,
                calls: 2,
                failures: 2,
                slow: 0
            }]
        );
        let b = record_all(b, &cfg, &[OK, OK], 2_999);
        assert_eq!(b.buckets.len(), 2);
        assert_eq!(rates(&b, &cfg, 3_000), (4, 50.0, 0.0));
        // At 11s the 1s bucket has expired (window covers 2s..=11s).
        assert_eq!(rates(&b, &cfg, 11_000), (2, 0.0, 0.0));
        let later = record_all(b.clone(), &cfg, &[FAIL, FAIL], 11_000);
        assert_eq!((later.state, later.buckets.len()), (State::Closed, 2));
        // Within the window, 5 calls at 3/5 failures trips.
        let b = record_all(b, &cfg, &[FAIL], 10_999);
        assert_eq!(b, open_at(10_999));
        // Many seconds never hold more than window_size buckets.
        let mut b = Breaker::default();
        let many = BreakerConfig {
            minimum_calls: 1_000_000,
            ..cfg
        };
        for s in 0..100u64 {
            b = record_outcome(&b, &many, &OK, s * 1000);
        }
        assert_eq!(b.buckets.len(), 10);
        assert_eq!(b.buckets.first().map(|x| x.start_ms), Some(90_000));
    }

    #[test]
    fn clock_going_backwards() {
        let cfg = BreakerConfig::default();
        // Opened "in the future": the wait restarts now instead of lasting for hours.
        let b = open_at(10_000_000);
        let (a, b2) = admit(&b, &cfg, 5_000);
        assert_eq!(
            a,
            Admission::Reject {
                retry_after_ms: 30_000
            }
        );
        assert_eq!(b2.opened_at_ms, 5_000);
        assert_eq!(admit(&b2, &cfg, 35_000).0, Admission::Allow);
        // Half-open since the future, with a max wait: no underflow, and the start is reset.
        let mw = BreakerConfig {
            max_wait_in_half_open_ms: 1_000,
            ..Default::default()
        };
        let h = Breaker {
            state: State::HalfOpen,
            half_open_since_ms: u64::MAX,
            ..Default::default()
        };
        let (a, h) = admit(&h, &mw, 0);
        assert_eq!((a, h.half_open_since_ms), (Admission::Allow, 0));
        // Time-based: a call from an earlier second joins the newest bucket.
        let tb = BreakerConfig {
            window_type: WindowType::TimeBased,
            window_size: 10,
            ..Default::default()
        };
        let b = record_all(Breaker::default(), &tb, &[OK], 5_000);
        let b = record_all(b, &tb, &[FAIL], 3_000);
        assert_eq!(
            b.buckets,
            [Bucket {
                start_ms: 5_000,
                calls: 2,
                failures: 1,
                slow: 0
            }]
        );
        // A far-future bucket is dropped as corrupt.
        let b = Breaker {
            buckets: vec![Bucket {
                start_ms: u64::MAX,
                calls: 50,
                failures: 50,
                slow: 0,
            }],
            ..Default::default()
        };
        assert_eq!(rates(&b, &tb, 1_000), (0, 0.0, 0.0));
    }

    #[test]
    fn hostile_state() {
        let cfg = BreakerConfig::default();
        let huge = Bucket {
            start_ms: u64::MAX,
            calls: u32::MAX,
            failures: u32::MAX,
            slow: u32::MAX,
        };
        let b = Breaker {
            buckets: vec![huge.clone(); 200_000],
            ..Default::default()
        };
        assert_eq!(
            rates(&b, &cfg, 0),
            (100 * u64::from(u32::MAX), 100.0, 100.0)
        );
        let lenient = BreakerConfig {
            failure_rate_threshold: 100.0,
            slow_call_rate_threshold: 100.0,
            ..cfg.clone()
        };
        let b2 = record_outcome(&b, &lenient, &OK, u64::MAX);
        assert_eq!((b2.state, b2.buckets.len()), (State::Closed, 100));
        // Failures above calls are clamped: rates never exceed 100%.
        let odd = Breaker {
            buckets: vec![Bucket {
                start_ms: 0,
                calls: 1,
                failures: 9,
                slow: 9,
            }],
            ..Default::default()
        };
        assert_eq!(rates(&odd, &cfg, 0), (1, 100.0, 100.0));
        let odd_half = Breaker {
            state: State::HalfOpen,
            half_open_calls: u32::MAX,
            half_open_failures: 0,
            half_open_admitted: u32::MAX,
            ..Default::default()
        };
        assert_eq!(record_outcome(&odd_half, &cfg, &OK, 0), Breaker::default());
        assert_eq!(
            admit(&odd_half, &cfg, 0).0,
            Admission::Reject {
                retry_after_ms: 1000
            }
        );
        // Unchecked nonsense config: still no panic.
        let bad = BreakerConfig {
            window_size: 0,
            minimum_calls: 0,
            permitted_calls_in_half_open: 0,
            wait_in_open_ms: 0,
            failure_rate_threshold: f32::NAN,
            window_type: WindowType::TimeBased,
            ..cfg
        };
        let b = record_all(Breaker::default(), &bad, &[FAIL; 3], u64::MAX);
        assert_eq!(b.buckets.len(), 1);
        assert_eq!(admit(&open_at(u64::MAX), &bad, 0).0, Admission::Allow);
    }

    #[test]
    fn config_check_and_serde() {
        assert_eq!(BreakerConfig::default().check(), Ok(()));
        type Mutate = fn(&mut BreakerConfig);
        let cases: [(Mutate, &str); 9] = [
            (|c| c.window_size = 0, "window_size"),
            (|c| c.window_size = 10_001, "window_size"),
            (|c| c.minimum_calls = 0, "minimum_calls"),
            (
                |c| c.minimum_calls = 101,
                "minimum_calls must be <= window_size",
            ),
            (|c| c.failure_rate_threshold = 0.0, "failure_rate_threshold"),
            (
                |c| c.slow_call_rate_threshold = 100.5,
                "slow_call_rate_threshold",
            ),
            (|c| c.slow_call_duration_ms = 0, "slow_call_duration_ms"),
            (|c| c.wait_in_open_ms = 0, "wait_in_open_ms"),
            (
                |c| c.permitted_calls_in_half_open = 0,
                "permitted_calls_in_half_open",
            ),
        ];
        for (mutate, want) in cases {
            let mut c = BreakerConfig::default();
            mutate(&mut c);
            let got = c.check().unwrap_err();
            assert!(got.contains(want), "{got} should mention {want}");
        }
        let time = BreakerConfig {
            window_type: WindowType::TimeBased,
            minimum_calls: 1000,
            ..Default::default()
        };
        assert_eq!(time.check(), Ok(()));
        let c: BreakerConfig =
            serde_json::from_str(r#"{"window_type":"time_based","window_size":60}"#).unwrap();
        assert_eq!(
            (c.window_type, c.window_size, c.minimum_calls),
            (WindowType::TimeBased, 60, 10)
        );
        assert!(serde_json::from_str::<BreakerConfig>(r#"{"windowSize":1}"#).is_err());
        let a = serde_json::to_string(&Admission::Reject { retry_after_ms: 5 }).unwrap();
        assert_eq!(a, r#"{"reject":{"retry_after_ms":5}}"#);
        assert_eq!(
            serde_json::to_string(&State::HalfOpen).unwrap(),
            r#""half_open""#
        );
        let b = record_all(Breaker::default(), &small(), &[OK, FAIL], 7);
        let back: Breaker = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back, b);
        let partial: Breaker =
            serde_json::from_str(r#"{"state":"open","opened_at_ms":9}"#).unwrap();
        assert_eq!(partial, open_at(9));
    }

    /// Deterministic fuzz over random operations and jumpy clocks: never panics, and the
    /// window never outgrows its size.
    #[test]
    fn fuzz_invariants() {
        let cfgs = [
            small(),
            BreakerConfig {
                window_type: WindowType::TimeBased,
                window_size: 3,
                minimum_calls: 2,
                max_wait_in_half_open_ms: 500,
                ..Default::default()
            },
            BreakerConfig {
                wait_in_open_ms: 10,
                permitted_calls_in_half_open: 1,
                ..small()
            },
        ];
        let mut seed = 99u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed >> 20
        };
        for cfg in &cfgs {
            let (mut b, mut now) = (Breaker::default(), 1_000_000u64);
            for _ in 0..5000 {
                now = match next() % 10 {
                    0 => now.saturating_sub(next() % 5000),
                    1 => now.saturating_add(next() % 100_000),
                    _ => now.saturating_add(next() % 700),
                };
                b = match next() % 12 {
                    0 => force_open(&b, now),
                    1 => reset(),
                    2..=5 => admit(&b, cfg, now).1,
                    k => {
                        let outcome =
                            [Outcome::Success, Outcome::Failure, Outcome::Ignored][k as usize % 3];
                        record_outcome(
                            &b,
                            cfg,
                            &CallResult {
                                outcome,
                                duration_ms: next() % 90_000,
                            },
                            now,
                        )
                    }
                };
                assert!(b.buckets.len() <= cfg.window_size as usize);
                let (_, f, s) = rates(&b, cfg, now);
                assert!((0.0..=100.0).contains(&f) && (0.0..=100.0).contains(&s));
                if b.state == State::HalfOpen {
                    assert!(b.half_open_admitted <= cfg.permitted_calls_in_half_open);
                }
            }
        }
    }
}
