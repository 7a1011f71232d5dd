//! Policy engine benchmarks: `cargo bench -p headshot-host --bench policy`.
//!
//! Prints `RESULT name: p50 X µs (p99 Y µs, n=N)` lines:
//! - validate + sanitize through wasm (per-call isolation: every call on a never-used
//!   instance) against the same rules run natively in this process — the baseline;
//! - the same wasm calls with the prewarmed pool disabled (instantiate inline per call);
//! - activation of a new component (cache miss: compile + type check + conformance + sled
//!   flush + swap) and of a stored one (cache hit);
//! - restart: opening the registry from sled state with the compiled-code cache warm.

use std::path::Path;
use std::time::{Duration, Instant};

use headshot_host::config::Config;
use headshot_host::policy::{PolicyKind, PolicySettings, Registry};
use headshot_host::state::StateDb;
use headshot_plugin_sdk::rules::{request, sanitize};

const INPUT: &str = r#"{"prompt":"professional headshot of a smiling architect, natural light","user_id":"user-1234","width":1024,"height":1024,"num_images":2,"style":"corporate"}"#;
const PROMPT: &str = "professional headshot of a smiling architect,\u{200B} natural   light";

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, usize) {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99), samples.len())
}

fn report(name: &str, samples: Vec<Duration>) -> f64 {
    let (p50, p99, n) = percentiles(samples);
    println!("RESULT {name}: p50 {p50:.2} µs (p99 {p99:.2} µs, n={n})");
    p50
}

fn time<F: FnMut()>(n: usize, pace: Duration, mut f: F) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            let took = start.elapsed();
            if !pace.is_zero() {
                // Sleep (not spin) so the background refill thread gets a core.
                std::thread::sleep(pace);
            }
            took
        })
        .collect()
}

/// A copy of `bytes` with a custom section appended, so it hashes (and compiles) anew.
fn with_nonce(bytes: &[u8], nonce: u64) -> Vec<u8> {
    let name = b"bench-nonce";
    let payload = nonce.to_le_bytes();
    let mut out = bytes.to_vec();
    out.push(0);
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

fn open(settings: PolicySettings, dir: &Path) -> (StateDb, Registry) {
    let state = StateDb::open(&dir.join("state")).expect("state");
    let registry = Registry::open(settings, &state, &dir.join("cache")).expect("registry");
    (state, registry)
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || std::env::var("HEADSHOT_BENCH_QUICK").is_ok();
    let n = if quick { 2_000 } else { 20_000 };
    let config = Config::default();
    let settings = PolicySettings::from_config(&config);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_state, registry) = open(settings.clone(), dir.path());
    println!(
        "machine: {} cores; wasmtime 48, pooling allocator, epoch deadlines",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // Warm up both paths.
    for _ in 0..500 {
        let _ = registry.validate(INPUT);
        let _ = registry.sanitize(PROMPT);
    }

    let native_sanitizer = sanitize::Sanitizer::new(settings.sanitizer.clone());
    report(
        "native_validate",
        time(n, Duration::ZERO, || {
            drop(std::hint::black_box(request::validate_input(
                INPUT,
                &settings.validator,
            )))
        }),
    );
    report(
        "native_sanitize",
        time(n, Duration::ZERO, || {
            drop(std::hint::black_box(native_sanitizer.sanitize(PROMPT)))
        }),
    );
    let native = report(
        "native_validate_sanitize",
        time(n, Duration::ZERO, || {
            let r = request::validate_input(INPUT, &settings.validator);
            let s = native_sanitizer.sanitize(PROMPT);
            let _ = std::hint::black_box((r, s));
        }),
    );
    // Paced like a busy worker (one job every 200 µs) so the background refill keeps up.
    let pace = Duration::from_micros(200);
    let wasm = report(
        "wasm_validate_sanitize_prewarmed",
        time(n, pace, || {
            let r = registry.validate(INPUT).0.expect("valid");
            let s = registry.sanitize(PROMPT).0.expect("sanitized");
            let _ = std::hint::black_box((r, s));
        }),
    );
    report(
        "wasm_validate_prewarmed",
        time(n, pace, || {
            drop(std::hint::black_box(registry.validate(INPUT)))
        }),
    );
    report(
        "wasm_sanitize_prewarmed",
        time(n, pace, || {
            drop(std::hint::black_box(registry.sanitize(PROMPT)))
        }),
    );
    let status = registry.status().expect("status");
    println!(
        "INFO validator calls {} (cold {}), sanitizer calls {} (cold {})",
        status[0].calls, status[0].cold_calls, status[1].calls, status[1].cold_calls
    );
    println!("RATIO wasm_prewarmed/native: {:.1}x", wasm / native);

    // No pool: each call instantiates and configures its instance inline.
    let mut cold_settings = settings.clone();
    cold_settings.prewarm = 0;
    let cold_dir = tempfile::tempdir().expect("tempdir");
    let (_cold_state, cold) = open(cold_settings, cold_dir.path());
    let wasm_cold = report(
        "wasm_validate_sanitize_instantiate_per_call",
        time(n / 4, Duration::ZERO, || {
            let r = cold.validate(INPUT).0.expect("valid");
            let s = cold.sanitize(PROMPT).0.expect("sanitized");
            let _ = std::hint::black_box((r, s));
        }),
    );
    println!(
        "RATIO wasm_instantiate_per_call/native: {:.1}x",
        wasm_cold / native
    );

    // Activation of a component never seen before (full compile), then of a stored one.
    let example = std::fs::read(env!("HEADSHOT_EXAMPLE_VALIDATOR_WASM")).expect("example");
    let builtin_sha = registry.active(PolicyKind::Validator).meta().sha256.clone();
    let rounds = if quick { 3 } else { 7 };
    let mut fresh = Vec::new();
    let mut stored = Vec::new();
    for i in 0..rounds {
        let bytes = with_nonce(
            &example,
            1_000 + i as u64 + std::process::id() as u64 * 1_000_000,
        );
        let start = Instant::now();
        registry.push(PolicyKind::Validator, &bytes).expect("push");
        fresh.push(start.elapsed());
        let start = Instant::now();
        registry
            .activate(PolicyKind::Validator, &builtin_sha)
            .expect("activate");
        stored.push(start.elapsed());
    }
    let ms = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    println!(
        "RESULT activation_new_component: median {:.1} ms (n={rounds}, {} KB component)",
        ms(&fresh),
        example.len() / 1024
    );
    println!(
        "RESULT activation_stored_version: median {:.3} ms (n={rounds})",
        ms(&stored)
    );
    // The same with Cranelift allowed on every core (policies.parallel_compile = true).
    let mut par_settings = settings.clone();
    par_settings.engine.parallel_compile = true;
    let par_dir = tempfile::tempdir().expect("tempdir");
    let (_par_state, par) = open(par_settings, par_dir.path());
    let mut par_fresh = Vec::new();
    for i in 0..rounds {
        let bytes = with_nonce(
            &example,
            7_000 + i as u64 + std::process::id() as u64 * 1_000_000,
        );
        let start = Instant::now();
        par.push(PolicyKind::Validator, &bytes).expect("push");
        par_fresh.push(start.elapsed());
    }
    println!(
        "RESULT activation_new_component_parallel_compile: median {:.1} ms (n={rounds})",
        ms(&par_fresh)
    );
    drop(par);

    // Restart: reopen state and registry with the compiled-code cache warm.
    drop(registry);
    drop(_state);
    let mut opens = Vec::new();
    let mut registry_only = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        let state = StateDb::open(&dir.path().join("state")).expect("state");
        let mid = Instant::now();
        let registry =
            Registry::open(settings.clone(), &state, &dir.path().join("cache")).expect("registry");
        registry_only.push(mid.elapsed());
        opens.push(start.elapsed());
        drop(registry);
        drop(state);
    }
    println!(
        "RESULT restart_registry_from_cache: median {:.2} ms (n={rounds}, 3 slots)",
        ms(&registry_only)
    );
    println!(
        "RESULT restart_state_and_registry: median {:.2} ms (n={rounds})",
        ms(&opens)
    );
}
