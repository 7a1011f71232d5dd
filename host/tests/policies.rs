//! The policy engine through real components built from this repo: the built-in rules, the
//! SDK example, containment of hostile guests, upload refusals, hot swap under load,
//! rollback and restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headshot_host::config::Config;
use headshot_host::policy::{
    CallError, PolicyKind, PolicySettings, PolicySource, Registry, UploadError, ValidateError,
    builtin_bytes, sha256_hex, test_component,
};
use headshot_host::state::StateDb;
use headshot_plugin_sdk::rules::breaker::{self, Admission, Breaker, CallResult, Outcome};
use headshot_plugin_sdk::rules::retry::{Attempt, ErrorKind, RetryDecision};
use headshot_plugin_sdk::rules::sanitize::Sanitized;

const EXAMPLE: &str = env!("HEADSHOT_EXAMPLE_VALIDATOR_WASM");
const HOSTILE: &str = env!("HEADSHOT_TEST_HOSTILE_WASM");
const FORBIDDEN: &str = env!("HEADSHOT_TEST_FORBIDDEN_IMPORT_WASM");

/// Production settings with roomy deadlines: CI machines run these tests in parallel on two
/// cores, and a test about swaps or rules must not fail because a 20 ms deadline fired under
/// that load. Tests about deadlines set their own.
fn settings() -> PolicySettings {
    let mut s = PolicySettings::from_config(&Config::default());
    for slot in &mut s.slots {
        slot.deadline = Duration::from_millis(1000);
    }
    s
}

/// Compiled code is keyed by content and engine, so tests can share one cache.
fn shared_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("policy-cache")
}

struct Fixture {
    _dir: tempfile::TempDir,
    state_dir: PathBuf,
    registry: Registry,
}

fn open(settings: PolicySettings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let state = StateDb::open(&state_dir).unwrap();
    let registry = Registry::open(settings, &state, &shared_cache()).unwrap();
    Fixture {
        _dir: dir,
        state_dir,
        registry,
    }
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn request(prompt: &str, width: u32, height: u32) -> String {
    serde_json::json!({"prompt": prompt, "user_id": "user-1", "width": width, "height": height})
        .to_string()
}

#[test]
fn builtin_validator_fills_defaults_and_names_every_bad_field() {
    let f = open(settings());
    let (result, used) = f
        .registry
        .validate(r#"{"prompt":"a portrait of an engineer","user_id":"u-42"}"#);
    let req = result.unwrap();
    assert_eq!(
        (req.width, req.height, req.steps, req.num_images),
        (1024, 1024, 4, 1)
    );
    assert_eq!(req.guidance, None);
    assert_eq!(
        used.sha256,
        sha256_hex(builtin_bytes(PolicyKind::Validator))
    );
    assert!(!used.fallback);

    let (result, _) = f.registry.validate(
        r#"{"prompt":"","user_id":"../x","width":500,"height":99999,"num_images":9,"style":"gothic","colour":"red"}"#,
    );
    let Err(ValidateError::Invalid(errors)) = result else {
        panic!("expected field errors, got {result:?}")
    };
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for field in [
        "/input/prompt",
        "/input/user_id",
        "/input/width",
        "/input/height",
        "/input/num_images",
        "/input/style",
        "/input/colour",
    ] {
        assert!(fields.contains(&field), "no error for {field}: {errors:?}");
    }
    let width = errors.iter().find(|e| e.field == "/input/width").unwrap();
    assert!(width.message.contains("16"), "{width:?}");
}

#[test]
fn builtin_sanitizer_cleans_and_blocks_obfuscated_terms() {
    let f = open(settings());
    let (result, _) = f
        .registry
        .sanitize("a\u{200B} portrait\u{202E}   of a\tchef");
    match result.unwrap() {
        Sanitized::Cleaned { text, changes } => {
            assert_eq!(text, "a portrait of a chef");
            assert!(!changes.is_empty());
        }
        other => panic!("expected cleaned, got {other:?}"),
    }
    assert_eq!(
        f.registry.sanitize("a portrait of a chef").0.unwrap(),
        Sanitized::Unchanged
    );
    for bad in [
        "a NUDE portrait",
        "n.u.d.e portrait",
        "nud3 portrait",
        "a naked chef",
    ] {
        match f.registry.sanitize(bad).0.unwrap() {
            Sanitized::Reject(e) => {
                assert_eq!(e.code, "unsafe_content");
                assert!(
                    !e.message.to_lowercase().contains("nud"),
                    "the term must not be echoed: {e:?}"
                );
            }
            other => panic!("{bad:?} was not rejected: {other:?}"),
        }
    }
}

#[test]
fn builtin_resilience_opens_breaker_and_schedules_retries() {
    let f = open(settings());
    let mut state = Breaker::default();
    for i in 0..10 {
        let (next, _) = f.registry.record_outcome(
            &state,
            &CallResult {
                outcome: Outcome::Failure,
                duration_ms: 5,
            },
            1000 + i,
        );
        state = next.unwrap();
    }
    assert_eq!(state.state, breaker::State::Open);
    let (decision, _) = f.registry.admit(&state, 2000);
    assert!(
        matches!(decision.unwrap().0, Admission::Reject { retry_after_ms } if retry_after_ms > 0)
    );
    let attempt = Attempt {
        number: 1,
        kind: ErrorKind::ServerError,
        status: Some(503),
        retry_after_ms: None,
        elapsed_ms: 0,
        previous_delay_ms: 0,
    };
    assert!(
        matches!(f.registry.retry(&attempt, 0.5).0.unwrap(), RetryDecision::RetryAfter(ms) if ms <= 200)
    );
    let client = Attempt {
        kind: ErrorKind::ClientError,
        status: Some(400),
        ..attempt
    };
    assert!(matches!(
        f.registry.retry(&client, 0.5).0.unwrap(),
        RetryDecision::GiveUp(_)
    ));
}

#[test]
fn sdk_example_passes_policy_test_then_swaps_in_and_rolls_back() {
    let bytes = read(EXAMPLE);
    let report =
        test_component(&settings(), &shared_cache(), PolicyKind::Validator, &bytes).unwrap();
    assert_eq!(report.policy.name, "square-only");
    assert_eq!(report.policy.sdk_version, headshot_plugin_sdk::SDK_VERSION);
    assert!(report.cases.iter().all(|c| c.passed));

    let f = open(settings());
    assert!(
        f.registry
            .validate(&request("a portrait", 512, 768))
            .0
            .is_ok()
    );
    let (_, activation) = f.registry.push(PolicyKind::Validator, &bytes).unwrap();
    assert_eq!(activation.active.source, PolicySource::Upload);
    let (result, used) = f.registry.validate(&request("a portrait", 512, 768));
    let Err(ValidateError::Invalid(errors)) = result else {
        panic!("{result:?}")
    };
    assert_eq!(errors[0].code, "not_square");
    assert_eq!(used.sha256, sha256_hex(&bytes));

    let back = f.registry.rollback(PolicyKind::Validator).unwrap();
    assert_eq!(back.active.source, PolicySource::Builtin);
    assert!(
        f.registry
            .validate(&request("a portrait", 512, 768))
            .0
            .is_ok()
    );
    let err = f.registry.rollback(PolicyKind::Validator).unwrap_err();
    assert!(
        matches!(err, UploadError::NoPrevious(PolicyKind::Validator)),
        "{err}"
    );
}

#[test]
fn hostile_guest_is_contained_per_call_and_the_slot_keeps_serving() {
    // A roomy deadline, so the memory and stack limits (not the clock) are what stop those
    // attacks even on a loaded machine; the loop still ends on the deadline.
    let mut s = settings();
    s.slots[PolicyKind::Validator.index()].deadline = Duration::from_millis(500);
    let f = open(s);
    f.registry
        .push(PolicyKind::Validator, &read(HOSTILE))
        .unwrap();
    type Expect = fn(&CallError) -> bool;
    let cases: [(&str, Expect); 6] = [
        ("loop", |e| *e == CallError::Deadline),
        ("memory", |e| *e == CallError::Memory),
        ("recursion", |e| *e == CallError::StackOverflow),
        ("huge-output", |e| {
            matches!(
                e,
                CallError::Output(_) | CallError::Memory | CallError::Deadline
            )
        }),
        ("trap", |e| matches!(e, CallError::Trap(_))),
        // The SDK's panic hook logs the message; the host puts it in the error.
        (
            "panic",
            |e| matches!(e, CallError::Trap(t) if t.contains("a hostile panic with its reason") && t.contains("src/lib.rs")),
        ),
    ];
    for (attack, expected) in cases {
        let start = Instant::now();
        let (result, _) = f
            .registry
            .validate(&request(&format!("attack:{attack}"), 512, 512));
        let took = start.elapsed();
        match result {
            Err(ValidateError::Policy(failure)) => {
                assert!(expected(&failure.error), "{attack}: {failure}")
            }
            other => panic!("{attack}: expected a contained policy error, got {other:?}"),
        }
        assert!(took < Duration::from_secs(5), "{attack} took {took:?}");
        // The next ordinary call is served normally.
        assert!(
            f.registry
                .validate(&request("a portrait", 512, 512))
                .0
                .is_ok(),
            "after {attack}"
        );
    }
    // Log spam is truncated by the host, the call itself succeeds.
    assert!(
        f.registry
            .validate(&request("attack:log-spam", 512, 512))
            .0
            .is_ok()
    );
    let status = f.registry.status().unwrap();
    assert_eq!(status[0].failures, 6);
}

#[test]
fn fail_open_slot_falls_back_to_the_builtin_rules() {
    let mut s = settings();
    s.slots[PolicyKind::Validator.index()].on_error = headshot_host::policy::OnError::FailOpen;
    let f = open(s);
    f.registry
        .push(PolicyKind::Validator, &read(HOSTILE))
        .unwrap();
    let (result, used) = f.registry.validate(&request("attack:trap", 512, 512));
    assert!(result.is_ok(), "{result:?}");
    assert!(used.fallback);
}

#[test]
fn bad_uploads_are_refused_with_reasons_and_the_active_policy_stays() {
    let f = open(settings());
    let before = f
        .registry
        .active(PolicyKind::Validator)
        .meta()
        .sha256
        .clone();

    let err = f
        .registry
        .upload(PolicyKind::Validator, b"definitely not wasm")
        .unwrap_err();
    assert!(matches!(err, UploadError::NotAComponent(_)), "{err}");

    let err = f
        .registry
        .upload(PolicyKind::Validator, builtin_bytes(PolicyKind::Sanitizer))
        .unwrap_err();
    assert!(matches!(err, UploadError::WrongWorld { .. }), "{err}");

    let err = f
        .registry
        .upload(PolicyKind::Validator, &read(FORBIDDEN))
        .unwrap_err();
    match &err {
        UploadError::ForbiddenImport(names) => {
            assert!(names.contains("wasi:filesystem/"), "{names}")
        }
        other => panic!("expected a forbidden import, got {other}"),
    }

    let err = f
        .registry
        .upload(PolicyKind::Validator, &vec![0u8; 11 << 20])
        .unwrap_err();
    assert!(matches!(err, UploadError::TooLarge { .. }), "{err}");

    let err = f
        .registry
        .activate(PolicyKind::Validator, &"0".repeat(64))
        .unwrap_err();
    assert!(matches!(err, UploadError::UnknownHash { .. }), "{err}");

    assert_eq!(
        f.registry.active(PolicyKind::Validator).meta().sha256,
        before
    );
    assert!(
        f.registry
            .validate(&request("a portrait", 512, 512))
            .0
            .is_ok()
    );
}

#[test]
fn guests_that_always_misbehave_fail_conformance() {
    // A memory bomb fills 32 MiB in ~16 ms, so on a loaded machine the 20 ms deadline may
    // fire first; either limit contains it.
    // Whether the attack already meets each new instance's warm-up validate (loop and memory
    // do; reject-all only fails the conformance cases).
    for (attack, needles, warm_up_fails) in [
        ("loop", &["deadline"][..], true),
        ("reject-all", &["accepts a standard request"][..], false),
        ("memory", &["memory", "deadline"][..], true),
    ] {
        let mut s = settings();
        s.slots[PolicyKind::Validator.index()].custom = serde_json::json!({ "always": attack });
        s.slots[PolicyKind::Validator.index()].deadline = Duration::from_millis(200);
        let f = open(s);
        let start = Instant::now();
        let err = f
            .registry
            .upload(PolicyKind::Validator, &read(HOSTILE))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, UploadError::Conformance { .. } | UploadError::Start(_)),
            "{attack}: {text}"
        );
        assert!(needles.iter().any(|n| text.contains(n)), "{attack}: {text}");
        // An attack the warm-up validate meets is named as that call, not as a refused
        // configuration.
        assert_eq!(
            matches!(err, UploadError::Start(_)),
            warm_up_fails,
            "{attack}: {text}"
        );
        if warm_up_fails {
            assert!(text.contains("warm-up call"), "{attack}: {text}");
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{attack}");
        assert!(
            f.registry
                .validate(&request("a portrait", 512, 512))
                .0
                .is_ok()
        );
    }
}

#[test]
fn swapping_while_threads_call_the_slot_fails_no_call() {
    let f = open(settings());
    let registry = Arc::new(f.registry);
    let example = read(EXAMPLE);
    let example_sha = registry
        .upload(PolicyKind::Validator, &example)
        .unwrap()
        .policy
        .sha256;
    let builtin_sha = sha256_hex(builtin_bytes(PolicyKind::Validator));
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (registry, stop, calls) =
                (Arc::clone(&registry), Arc::clone(&stop), Arc::clone(&calls));
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (result, _) = registry.validate(&request("a portrait", 512, 512));
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = result {
                        failures.push(format!("{e:?}"));
                    }
                }
                failures
            })
        })
        .collect();
    for i in 0..10 {
        let sha = if i % 2 == 0 {
            &example_sha
        } else {
            &builtin_sha
        };
        // Hashes are hex in either case, as tools print them.
        let sha = if i == 3 {
            sha.to_ascii_uppercase()
        } else {
            sha.to_string()
        };
        let report = registry.activate(PolicyKind::Validator, &sha).unwrap();
        assert!(!report.unchanged);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed calls: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(calls.load(Ordering::Relaxed) > 10);
}

#[test]
fn restart_keeps_the_active_version_and_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let example = read(EXAMPLE);
    {
        let state = StateDb::open(&state_dir).unwrap();
        let registry = Registry::open(settings(), &state, &shared_cache()).unwrap();
        registry.push(PolicyKind::Validator, &example).unwrap();
    }
    let state = StateDb::open(&state_dir).unwrap();
    let registry = Registry::open(settings(), &state, &shared_cache()).unwrap();
    assert_eq!(
        registry.active(PolicyKind::Validator).meta().sha256,
        sha256_hex(&example)
    );
    assert_eq!(
        registry.active(PolicyKind::Validator).meta().source,
        PolicySource::Upload
    );
    let status = registry.status().unwrap();
    assert_eq!(status[0].previous.len(), 1);
    assert!(matches!(
        registry.validate(&request("a portrait", 512, 768)).0,
        Err(ValidateError::Invalid(_))
    ));
    drop(registry);
    drop(state);
    let f = Fixture {
        state_dir,
        registry: Registry::open(
            settings(),
            &StateDb::open(&dir.path().join("state")).unwrap(),
            &shared_cache(),
        )
        .unwrap(),
        _dir: dir,
    };
    assert!(f.state_dir.exists());
    f.registry.rollback(PolicyKind::Validator).unwrap();
    assert_eq!(
        f.registry.active(PolicyKind::Validator).meta().source,
        PolicySource::Builtin
    );
}

#[test]
fn a_stored_version_that_does_not_load_at_start_is_stood_in_for_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let hostile = read(HOSTILE);
    let sha = sha256_hex(&hostile);
    let reopen = |s: PolicySettings| {
        let state = StateDb::open(&state_dir).unwrap();
        let registry = Registry::open(s, &state, &shared_cache()).unwrap();
        (state, registry)
    };
    {
        let (_state, registry) = reopen(settings());
        registry.push(PolicyKind::Validator, &hostile).unwrap();
    }
    // Settings under which the active version fails its start (it attacks every call).
    let mut attacking = settings();
    attacking.slots[PolicyKind::Validator.index()].custom = serde_json::json!({ "always": "loop" });
    attacking.slots[PolicyKind::Validator.index()].deadline = Duration::from_millis(200);
    {
        let (_state, registry) = reopen(attacking.clone());
        let active = registry.active(PolicyKind::Validator);
        assert_eq!(active.meta().source, PolicySource::Builtin);
        let status = registry.status().unwrap();
        let why = status[0]
            .fallback
            .as_deref()
            .expect("the stand-in is reported");
        assert!(why.contains(&sha) && why.contains("does not load"), "{why}");
        assert!(
            registry
                .validate(&request("a portrait", 512, 512))
                .0
                .is_ok()
        );
    }
    // Settings fixed: the operator's version is back, with no stand-in.
    {
        let (_state, registry) = reopen(settings());
        assert_eq!(registry.active(PolicyKind::Validator).meta().sha256, sha);
        assert_eq!(registry.status().unwrap()[0].fallback, None);
    }
    // Standing in, activating the built-in is a change that is kept.
    {
        let (_state, registry) = reopen(attacking);
        let builtin = registry.active(PolicyKind::Validator).meta().sha256.clone();
        let report = registry.activate(PolicyKind::Validator, &builtin).unwrap();
        assert!(!report.unchanged);
        assert_eq!(registry.status().unwrap()[0].fallback, None);
    }
    let (_state, registry) = reopen(settings());
    assert_eq!(
        registry.active(PolicyKind::Validator).meta().source,
        PolicySource::Builtin
    );
}

#[test]
fn a_version_is_activated_by_a_prefix_of_its_hash() {
    let f = open(settings());
    let example = read(EXAMPLE);
    let sha = sha256_hex(&example);
    let builtin = f
        .registry
        .active(PolicyKind::Validator)
        .meta()
        .sha256
        .clone();
    f.registry.push(PolicyKind::Validator, &example).unwrap();
    // The built-in back by the first 12 hex digits, upper case as some tools print them.
    let report = f
        .registry
        .activate(PolicyKind::Validator, &builtin[..12].to_ascii_uppercase())
        .unwrap();
    assert_eq!(report.active.sha256, builtin);
    let report = f
        .registry
        .activate(PolicyKind::Validator, &sha[..8])
        .unwrap();
    assert_eq!(report.active.sha256, sha);
    // The active version again: nothing changes, and no history entry is added.
    let depth = f.registry.status().unwrap()[0].previous.len();
    let again = f.registry.activate(PolicyKind::Validator, &sha).unwrap();
    assert!(again.unchanged);
    assert_eq!(f.registry.status().unwrap()[0].previous.len(), depth);
    // A prefix nothing starts with, and one too short to mean anything, are unknown hashes.
    let other = if sha.starts_with('f') {
        "0000000000"
    } else {
        "ffffffffff"
    };
    for given in [other, &sha[..7]] {
        let err = f
            .registry
            .activate(PolicyKind::Validator, given)
            .unwrap_err();
        assert!(
            matches!(err, UploadError::UnknownHash { .. }),
            "{given}: {err}"
        );
    }
}
