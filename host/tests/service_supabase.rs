//! The worker with Supabase storage, over real HTTP to an in-process server that follows
//! ref/supabase.md: retries, timeouts, the storage circuit breaker (and its state surviving a
//! restart), images kept locally while storage is down.

#[path = "support/fake_supabase.rs"]
mod fake_supabase;
#[path = "support/server.rs"]
mod support;

use std::time::Duration;

use fake_supabase::{BUCKET, FakeSupabase, Fault, SERVICE_JWT};
use headshot_host::config::{Config, StorageBackend};
use headshot_plugin_sdk::rules::retry::Jitter;
use serde_json::{Value, json};
use support::*;

fn config(dir: &std::path::Path, fake: &FakeSupabase) -> Config {
    let mut c = test_config(dir);
    c.storage.backend = StorageBackend::Supabase;
    c.storage.supabase.url = fake.base_url();
    c.storage.supabase.service_key = SERVICE_JWT.into();
    c.storage.supabase.bucket = BUCKET.into();
    c.storage.supabase.timeout_ms = 400;
    let r = &mut c.policies.resilience;
    r.retry.initial_delay_ms = 10;
    r.retry.max_delay_ms = 40;
    r.retry.max_attempts = 4;
    r.retry.jitter = Jitter::None;
    r.breaker.minimum_calls = 4;
    r.breaker.window_size = 10;
    r.breaker.wait_in_open_ms = 600_000;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_and_each_image_is_stored_once() {
    let fake = FakeSupabase::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &fake);
    // Several failures in a row are the point here; keep the breaker out of it.
    cfg.policies.resilience.breaker.minimum_calls = 50;
    cfg.policies.resilience.breaker.window_size = 100;
    let r = serve(cfg).await;
    let c = client();

    fake.fail_next(1, Fault::Status500Json);
    fake.fail_next(1, Fault::Gateway502Html);
    let v = runsync(&c, &r, "a portrait after two failures").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    assert_eq!(fake.objects_stored(), 1);
    let url = v["output"]["images"][0]["url"].as_str().unwrap();
    let png = c.get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // A slow answer past the timeout is retried; the late first write and the retry still
    // leave exactly one object (the retry sees the duplicate and treats it as done).
    fake.fail_next(1, Fault::Slow(Duration::from_millis(900)));
    let v = runsync(&c, &r, "a portrait after a timeout").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fake.objects_stored(), 2);

    fake.fail_next(
        1,
        Fault::Status429 {
            retry_after_secs: 0,
        },
    );
    fake.fail_next(1, Fault::Refuse);
    let v = runsync(&c, &r, "a portrait after a refusal").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    assert_eq!(fake.objects_stored(), 3);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_keeps_images_opens_the_breaker_and_the_breaker_survives_a_restart() {
    let fake = FakeSupabase::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = serve(config(dir.path(), &fake)).await;
    let c = client();

    fake.fail_next(1000, Fault::Gateway502Html);
    let v = runsync(&c, &r, "a portrait while storage is down").await;
    assert_eq!(v["status"], "FAILED", "{v}");
    let err = job_error(&v);
    assert_eq!(err["error_type"], "storage_error", "{err}");
    assert_eq!(err["retryable"], true);
    let kept = std::path::PathBuf::from(err["details"]["kept_at"].as_str().expect("kept_at"));
    let files: Vec<_> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(&std::fs::read(&files[0]).unwrap()[..4], b"\x89PNG");

    // Four failed uploads reached minimum_calls at 100% failures: the breaker is open and
    // the next job fails fast, before generating, with a retry-after.
    let v = runsync(&c, &r, "a portrait with the breaker open").await;
    let err = job_error(&v);
    assert_eq!(err["error_type"], "circuit_open", "{err}");
    assert!(err["details"]["retry_after_ms"].as_u64().unwrap() > 0);
    let breakers: Value = get_admin_json(&c, admin(&r, "/admin/breakers")).await;
    assert_eq!(breakers["breakers"][0]["state"], "open", "{breakers}");
    r.shutdown().await;

    // Storage is back, but the breaker state lives in sled: still open after a restart.
    let fake_faults = fake.pending_faults();
    assert!(fake_faults > 0);
    let r = serve(config(dir.path(), &fake)).await;
    let v = runsync(&c, &r, "a portrait after the restart").await;
    assert_eq!(job_error(&v)["error_type"], "circuit_open", "{v}");

    // An operator closes it; with storage healthy again, jobs complete.
    let resp = admin_post(&c, &r, "/admin/breakers/storage/reset").await;
    assert!(resp.status().is_success());
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_breaker_lets_jobs_through_once_storage_recovers() {
    let fake = FakeSupabase::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = serve(config(dir.path(), &fake)).await;
    let c = client();
    let forced = admin_post(&c, &r, "/admin/breakers/storage/force-open").await;
    assert!(forced.status().is_success());
    let v = runsync(&c, &r, "refused while forced open").await;
    let err = job_error(&v);
    assert_eq!(err["error_type"], "circuit_open", "{v}");
    assert_eq!(err["details"]["forced_open"], true, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("/admin/breakers/storage/reset"),
        "{err}"
    );
    assert_eq!(fake.uploads_received(), 0);
    // Storage answers its health check, but no job can store: not ready.
    let ready = c.get(api(&r, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["storage"]["ok"], false, "{ready}");
    assert_eq!(ready["storage"]["breaker"], "forced_open", "{ready}");

    // Only the worker's own breakers can be forced or reset: a mistyped name is a 404 naming
    // them, and creates nothing.
    for action in ["force-open", "reset"] {
        let resp = admin_post(&c, &r, &format!("/admin/breakers/storge/{action}")).await;
        assert_eq!(resp.status(), 404, "{action}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(
            err["details"]["breakers"],
            json!(["storage", "model"]),
            "{err}"
        );
    }
    // The model breaker only records the loader's attempts: forcing it would change nothing.
    let resp = admin_post(&c, &r, "/admin/breakers/model/force-open").await;
    assert_eq!(resp.status(), 409);
    let listed = get_admin_json(&c, admin(&r, "/admin/breakers")).await;
    let names: Vec<&str> = listed["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["storage", "model"], "{listed}");
    let reset = admin_post(&c, &r, "/admin/breakers/storage/reset").await;
    assert!(reset.status().is_success());
    let ready = c.get(api(&r, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let v = runsync(&c, &r, "accepted after the reset").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    assert_eq!(fake.objects_stored(), 1);
    r.shutdown().await;
}
