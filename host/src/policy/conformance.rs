//! The cases every policy of a kind must pass before it is activated, run through the real
//! call path under production limits. `headshot policy test` runs the same cases, so a
//! policy that passes locally behaves the same in the worker.
//!
//! The cases are deliberately about the contract, not the built-in's exact behaviour, so a
//! custom policy that adds rules (e.g. "square images only") still passes.

use std::time::{Duration, Instant};

use headshot_plugin_sdk::envelope::ResilienceConfig;
use headshot_plugin_sdk::rules::breaker::{self, Admission, Breaker, CallResult, Outcome};
use headshot_plugin_sdk::rules::request::{self, ValidatorConfig};
use headshot_plugin_sdk::rules::retry::{Attempt, ErrorKind, RetryDecision};
use headshot_plugin_sdk::rules::sanitize::{Sanitized, SanitizerConfig};
use serde::Serialize;

use super::loaded::LoadedPolicy;

/// The standard settings of the slot under test; cases are derived from them.
#[derive(Clone, Debug)]
pub enum StandardSettings {
    /// Validator limits.
    Validator(ValidatorConfig),
    /// Sanitizer settings.
    Sanitizer(SanitizerConfig),
    /// Breaker and retry settings.
    Resilience(ResilienceConfig),
}

/// One case's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseResult {
    /// What the case checks.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// Why not, when it failed.
    pub detail: Option<String>,
    /// Time the call(s) took, microseconds.
    pub micros: u64,
}

/// Runs every case for the policy's kind.
pub fn run(policy: &LoadedPolicy, settings: &StandardSettings) -> Vec<CaseResult> {
    match settings {
        StandardSettings::Validator(cfg) => validator_cases(policy, cfg),
        StandardSettings::Sanitizer(cfg) => sanitizer_cases(policy, cfg),
        StandardSettings::Resilience(cfg) => resilience_cases(policy, cfg),
    }
}

fn case(name: &str, f: impl FnOnce() -> Result<(), String>) -> CaseResult {
    let start = Instant::now();
    let outcome = f();
    let micros = start.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
    CaseResult {
        name: name.into(),
        passed: outcome.is_ok(),
        detail: outcome.err(),
        micros,
    }
}

fn validator_cases(p: &LoadedPolicy, cfg: &ValidatorConfig) -> Vec<CaseResult> {
    let side = (cfg.min_size.max(512).min(cfg.max_width).min(cfg.max_height) / 16) * 16;
    let valid = format!(
        r#"{{"prompt":"a portrait of a smiling teacher","user_id":"user-123","width":{side},"height":{side}}}"#
    );
    let refuse = |input: &str, field: &str| -> Result<(), String> {
        match p.validate(input).map_err(|e| e.to_string())? {
            Ok(r) => Err(format!("accepted {input} as {r:?}")),
            Err(errors) if field.is_empty() || errors.iter().any(|e| e.field == field) => Ok(()),
            Err(errors) => Err(format!(
                "refused {input} but named no error at {field}: {errors:?}"
            )),
        }
    };
    vec![
        case("accepts a standard request", || {
            let r = p
                .validate(&valid)
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("refused {valid}: {e:?}"))?;
            let problems = request::check_request(&r, cfg);
            if !problems.is_empty() {
                return Err(format!(
                    "returned a request outside the worker's limits: {problems:?}"
                ));
            }
            if r.user_id != "user-123" || r.width != side || r.height != side {
                return Err(format!("changed user_id or size: {r:?}"));
            }
            Ok(())
        }),
        case("refuses a missing prompt", || {
            refuse(r#"{"user_id":"user-123"}"#, "/input/prompt")
        }),
        case("refuses an unsafe user_id", || {
            refuse(
                r#"{"prompt":"a portrait","user_id":"../../etc"}"#,
                "/input/user_id",
            )
        }),
        case("refuses unknown fields", || {
            refuse(
                r#"{"prompt":"a portrait","user_id":"u1","colour":"red"}"#,
                "/input/colour",
            )
        }),
        case("refuses a width beyond the limit", || {
            let w = cfg.max_width.saturating_add(16);
            refuse(
                &format!(r#"{{"prompt":"a portrait","user_id":"u1","width":{w},"height":{side}}}"#),
                "/input/width",
            )
        }),
        case("refuses input that is not an object", || {
            refuse("[1,2,3]", "")
        }),
        case("refuses invalid JSON", || refuse("{\"prompt\":", "")),
    ]
}

fn sanitizer_cases(p: &LoadedPolicy, cfg: &SanitizerConfig) -> Vec<CaseResult> {
    let mut cases = vec![
        case("keeps a clean prompt", || {
            match p
                .sanitize("a friendly portrait of a teacher")
                .map_err(|e| e.to_string())?
            {
                Sanitized::Unchanged => Ok(()),
                Sanitized::Cleaned { text, .. } if text == "a friendly portrait of a teacher" => {
                    Ok(())
                }
                other => Err(format!("changed a clean prompt: {other:?}")),
            }
        }),
        case("strips zero-width and bidi characters", || {
            match p
                .sanitize("a\u{200B} portrait\u{202E} of a\u{2066} pilot")
                .map_err(|e| e.to_string())?
            {
                Sanitized::Cleaned { text, .. } => {
                    if text
                        .chars()
                        .any(|c| matches!(c, '\u{200B}' | '\u{202E}' | '\u{2066}'))
                    {
                        Err(format!("left invisible characters in {text:?}"))
                    } else if !text.contains("portrait") {
                        Err(format!("lost the prompt's words: {text:?}"))
                    } else {
                        Ok(())
                    }
                }
                other => Err(format!("expected a cleaned prompt, got {other:?}")),
            }
        }),
        case("refuses an empty prompt", || {
            match p.sanitize("  \u{200B}\t ").map_err(|e| e.to_string())? {
                Sanitized::Reject(_) => Ok(()),
                other => Err(format!("accepted an empty prompt: {other:?}")),
            }
        }),
        case("stays within the length cap", || {
            let long = "portrait ".repeat(cfg.max_chars as usize / 4 + 10);
            let len = |t: &str| t.chars().count();
            match p.sanitize(&long).map_err(|e| e.to_string())? {
                Sanitized::Cleaned { text, .. } if len(&text) <= cfg.max_chars as usize => Ok(()),
                Sanitized::Reject(_) => Ok(()),
                Sanitized::Unchanged if len(&long) <= cfg.max_chars as usize => Ok(()),
                other => Err(format!(
                    "returned more than {} characters: {:?}",
                    cfg.max_chars,
                    short(&other)
                )),
            }
        }),
    ];
    if let Some(term) = cfg.blocked_terms.first() {
        cases.push(case("rejects a configured blocked term", || {
            match p
                .sanitize(&format!("a portrait, {term}, studio light"))
                .map_err(|e| e.to_string())?
            {
                Sanitized::Reject(e) if e.code == "unsafe_content" => Ok(()),
                other => Err(format!(
                    "did not reject a blocked term with unsafe_content: {:?}",
                    short(&other)
                )),
            }
        }));
    }
    cases
}

fn short(s: &Sanitized) -> String {
    let text = format!("{s:?}");
    text.chars().take(120).collect()
}

fn resilience_cases(p: &LoadedPolicy, cfg: &ResilienceConfig) -> Vec<CaseResult> {
    let b = &cfg.breaker;
    let r = &cfg.retry;
    let now = 1_000_000_000u64;
    vec![
        case("a closed breaker admits", || {
            match p
                .admit(&Breaker::default(), now)
                .map_err(|e| e.to_string())?
            {
                (Admission::Allow, _) => Ok(()),
                other => Err(format!("refused a call on a fresh breaker: {other:?}")),
            }
        }),
        case("failures open the breaker", || {
            let mut state = Breaker::default();
            let calls = b.minimum_calls.max(1).saturating_add(1);
            for i in 0..calls {
                let failed = CallResult {
                    outcome: Outcome::Failure,
                    duration_ms: 1,
                };
                state = p
                    .record_outcome(&state, &failed, now + u64::from(i))
                    .map_err(|e| e.to_string())?;
            }
            if state.state != breaker::State::Open {
                return Err(format!(
                    "{calls} straight failures left the breaker {:?}",
                    state.state
                ));
            }
            match p
                .admit(&state, now + u64::from(calls))
                .map_err(|e| e.to_string())?
            {
                (Admission::Reject { retry_after_ms }, _)
                    if retry_after_ms <= b.wait_in_open_ms =>
                {
                    Ok(())
                }
                other => Err(format!("an open breaker answered {other:?}")),
            }
        }),
        case(
            "an open breaker lets a probe through after the wait",
            || {
                let open = Breaker {
                    state: breaker::State::Open,
                    opened_at_ms: now,
                    ..Breaker::default()
                };
                match p
                    .admit(&open, now + b.wait_in_open_ms + 1)
                    .map_err(|e| e.to_string())?
                {
                    (Admission::Allow, next) if next.state == breaker::State::HalfOpen => Ok(()),
                    other => Err(format!("expected a half-open probe, got {other:?}")),
                }
            },
        ),
        case("retries a connection error within the delay cap", || {
            let a = Attempt {
                number: 1,
                kind: ErrorKind::Connection,
                status: None,
                retry_after_ms: None,
                elapsed_ms: 0,
                previous_delay_ms: 0,
            };
            match p.retry(&a, 0.5).map_err(|e| e.to_string())? {
                RetryDecision::RetryAfter(ms) if ms <= r.max_delay_ms => Ok(()),
                other if r.max_attempts <= 1 => matches!(other, RetryDecision::GiveUp(_))
                    .then_some(())
                    .ok_or(format!("{other:?}")),
                other => Err(format!(
                    "expected a retry within {} ms, got {other:?}",
                    r.max_delay_ms
                )),
            }
        }),
        case("gives up after the last attempt", || {
            let a = Attempt {
                number: r.max_attempts,
                kind: ErrorKind::ServerError,
                status: Some(503),
                retry_after_ms: None,
                elapsed_ms: 0,
                previous_delay_ms: 100,
            };
            match p.retry(&a, 0.5).map_err(|e| e.to_string())? {
                RetryDecision::GiveUp(_) => Ok(()),
                other => Err(format!(
                    "retried attempt {} of {}: {other:?}",
                    r.max_attempts, r.max_attempts
                )),
            }
        }),
    ]
}

/// Failed cases as `name: why` lines.
pub fn failures(results: &[CaseResult]) -> Vec<String> {
    results
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail.as_deref().unwrap_or("failed")))
        .collect()
}

/// Total time of a run.
pub fn total(results: &[CaseResult]) -> Duration {
    Duration::from_micros(results.iter().map(|c| c.micros).sum())
}
