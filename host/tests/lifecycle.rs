//! Worker lifecycle: a model that fails to load recovers in the background without a restart;
//! one that never loads leaves the worker up, answering initialization_error and saying why.

#[path = "support/server.rs"]
mod support;

use std::time::{Duration, Instant};

use headshot_host::config::LoadMode;
use headshot_host::ingress::server::Running;
use headshot_host::pipeline::ModelSource;
use headshot_plugin_sdk::rules::retry::Jitter;
use serde_json::Value;
use support::*;

/// `/readyz`'s status and body once the model has failed to load `n` times (30 s at most).
async fn after_load_failures(c: &reqwest::Client, server: &Running, n: u64) -> (u16, Value) {
    let start = Instant::now();
    loop {
        let resp = c.get(api(server, "/readyz")).send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        if v["model"]["load_failures"].as_u64().unwrap_or(0) >= n {
            return (status, v);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never saw {n} failed loads: {v}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Loads at start, one attempt per load, and the background loader retries every `delay_ms`
/// (no jitter) for 50 tries.
fn eager_with_steady_retries(cfg: &mut headshot_host::config::Config, delay_ms: u64) {
    cfg.model.load = LoadMode::Eager;
    cfg.model.load_attempts = 1;
    let r = &mut cfg.policies.resilience.retry;
    r.initial_delay_ms = delay_ms;
    r.max_delay_ms = delay_ms;
    r.jitter = Jitter::None;
    r.max_attempts = 50;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_twice_then_loads_becomes_ready_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let mut cfg = test_config(dir.path());
    cfg.model.source = ModelSource::Dir(model_dir.clone());
    eager_with_steady_retries(&mut cfg, 150);
    let server = serve(cfg).await;
    let c = client();

    let start = Instant::now();
    let (status, v) = after_load_failures(&c, &server, 2).await;
    assert_eq!(status, 503);
    let problems = v["problems"].to_string();
    assert!(problems.contains("model"), "{problems}");
    // While it is down, jobs fail fast and say why.
    let job: Value = runsync(&c, &server, "early").await;
    let err = job_error(&job);
    assert_eq!(err["error_type"], "initialization_error", "{job}");
    // The retry-after is the supervisor's next try, floored at a second: 150 ms away here,
    // so the floor (the test below sees a later try).
    let after = err["details"]["retry_after_ms"].as_u64().unwrap();
    assert_eq!(after, 1000, "{err}");
    // The weights appear (a volume mounted late, a download finished).
    let staging = dir.path().join("staging");
    headshot_host::pipeline::demo::write_demo_weights(&staging).unwrap();
    std::fs::rename(&staging, &model_dir).unwrap();
    loop {
        let resp = c.get(api(&server, "/readyz")).send().await.unwrap();
        if resp.status() == 200 {
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["model"]["loaded"], true);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job: Value = runsync(&c, &server, "after recovery").await;
    assert_eq!(job["status"], "COMPLETED", "{job}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_tells_jobs_when_the_supervisor_tries_next_not_a_fixed_guess() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.model.source = ModelSource::Dir(dir.path().join("model"));
    eager_with_steady_retries(&mut cfg, 5000);
    let server = serve(cfg).await;
    let c = client();
    after_load_failures(&c, &server, 1).await;
    let job: Value = runsync(&c, &server, "early").await;
    let err = job_error(&job);
    assert_eq!(err["error_type"], "initialization_error", "{job}");
    // The next try is up to 5 s away: more than the floor, no more than the delay.
    let after = err["details"]["retry_after_ms"].as_u64().unwrap();
    assert!((1001..=5000).contains(&after), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_never_loads_leaves_the_worker_up_and_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let mut cfg = test_config(dir.path());
    cfg.model.source = ModelSource::Dir(missing.clone());
    cfg.model.load_attempts = 1;
    cfg.policies.resilience.retry.initial_delay_ms = 100;
    let server = serve(cfg).await;
    let c = client();
    for i in 0..3 {
        let job: Value = runsync(&c, &server, &format!("job {i}")).await;
        assert_eq!(job["status"], "FAILED");
        let err = job_error(&job);
        assert_eq!(err["error_type"], "initialization_error", "{err}");
        assert_eq!(err["retryable"], true);
        assert!(
            err["message"].as_str().unwrap().contains("no-such-model"),
            "{err}"
        );
    }
    let resp = c.get(api(&server, "/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["problems"][0].as_str().unwrap().contains("no-such-model"),
        "{v}"
    );
    assert_eq!(
        c.get(api(&server, "/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    server.shutdown().await;
}

/// A device this binary cannot drive is a configuration error: jobs say so and that retrying
/// cannot help, and the worker stops trying to load (it stays up for the operator to see why).
#[cfg(not(feature = "cuda"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_the_binary_cannot_drive_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.model.device = "cuda".parse().unwrap();
    eager_with_steady_retries(&mut cfg, 20);
    let server = serve(cfg).await;
    let c = client();
    let failures = || async {
        let v: Value = get_json(&c, api(&server, "/readyz")).await;
        v["model"]["load_failures"].as_u64().unwrap_or(0)
    };
    let start = Instant::now();
    while failures().await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the load never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job: Value = runsync(&c, &server, "on a GPU, please").await;
    let err = job_error(&job);
    assert_eq!(err["error_type"], "initialization_error", "{err}");
    assert_eq!(err["retryable"], false, "{err}");
    assert_eq!(err["details"]["permanent"], true, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("without CUDA"),
        "{err}"
    );
    // With 20 ms between tries, a retrying supervisor would have failed many more times; the
    // job's own load attempt adds one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(failures().await <= 2, "the load was retried");
    server.shutdown().await;
}
