//! The malicious policy catalogue, through the admin API of a running worker with production
//! limits: each upload is refused or each attack contained, with the time and memory it cost,
//! and the worker keeps serving jobs.

#[path = "support/server.rs"]
mod support;

use std::time::Instant;

use serde_json::Value;
use support::*;

fn rss(r: &headshot_host::ingress::server::Running) -> i64 {
    r.service.monitor().read().process_rss_bytes as i64
}

async fn upload(
    c: &reqwest::Client,
    r: &headshot_host::ingress::server::Running,
    kind: &str,
    bytes: Vec<u8>,
) -> (u16, Value) {
    let resp = c
        .post(admin(r, &format!("/admin/policies/{kind}")))
        .bearer_auth(ADMIN_TOKEN)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The hostile validator, built from `policies/testing/hostile`.
fn hostile() -> Vec<u8> {
    std::fs::read(env!("HEADSHOT_TEST_HOSTILE_WASM")).unwrap()
}

/// Uploads and activates the hostile validator (it passes conformance: it attacks only on
/// `attack:` prompts or under `custom.always`).
async fn activate_hostile(c: &reqwest::Client, r: &headshot_host::ingress::server::Running) {
    let (got, body) = upload(c, r, "validator", hostile()).await;
    assert_eq!(got, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_uploads_are_refused_and_hostile_calls_contained() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // Production deadlines for the policy calls under attack.
    cfg.policies.validator.deadline_ms = 20;
    let r = serve(cfg).await;
    let c = client();
    let forbidden = std::fs::read(env!("HEADSHOT_TEST_FORBIDDEN_IMPORT_WASM")).unwrap();
    let sanitizer =
        headshot_host::policy::builtin_bytes(headshot_host::policy::PolicyKind::Sanitizer).to_vec();

    for (case, bytes, status, needle) in [
        (
            "garbage bytes",
            b"\x00\x01garbage".to_vec(),
            422,
            "not a WebAssembly component",
        ),
        (
            "oversized upload",
            vec![0u8; (10 << 20) + 1],
            413,
            "limit of 10485760 bytes",
        ),
        (
            "wrong world",
            sanitizer,
            422,
            "does not implement the `validator` world",
        ),
        ("forbidden import", forbidden, 422, "wasi:filesystem"),
    ] {
        let t = Instant::now();
        let (got, body) = upload(&c, &r, "validator", bytes).await;
        eprintln!(
            "RESULT malicious {case}: HTTP {got} in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(got, status, "{case}: {body}");
        assert!(
            body["message"].as_str().unwrap_or("").contains(needle),
            "{case}: {body}"
        );
    }

    // A module that passes conformance but attacks on some inputs: activated, then contained
    // per call; each attack costs one job, never the worker.
    activate_hostile(&c, &r).await;
    for attack in ["loop", "memory", "recursion", "huge-output", "trap"] {
        let before = rss(&r);
        let t = Instant::now();
        let v: Value = runsync(&c, &r, &format!("attack:{attack}")).await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let err = job_error(&v);
        eprintln!(
            "RESULT malicious call {attack}: {} ({}) in {ms:.1} ms, RSS {:+.1} MiB",
            err["error_type"],
            err["details"]["limit"],
            (rss(&r) - before) as f64 / 1048576.0
        );
        assert_eq!(err["error_type"], "policy_error", "{attack}: {v}");
        let ok: Value = runsync(&c, &r, "a normal portrait").await;
        assert_eq!(ok["status"], "COMPLETED", "after {attack}: {ok}");
    }
    // Roll back to the built-in.
    let resp = admin_post(&c, &r, "/admin/policies/validator/rollback").await;
    assert!(resp.status().is_success());
    let v: Value = runsync(&c, &r, "attack:loop").await;
    assert_eq!(
        v["status"], "COMPLETED",
        "the built-in treats it as a prompt: {v}"
    );
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_that_always_misbehave_are_refused_at_upload() {
    for attack in ["loop", "memory", "reject-all", "trap"] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.policies.validator.deadline_ms = 20;
        let mut custom = toml::Table::new();
        custom.insert("always".into(), toml::Value::String(attack.into()));
        cfg.policies.validator.custom = custom;
        let r = serve(cfg).await;
        let c = client();
        let before = rss(&r);
        let t = Instant::now();
        let (got, body) = upload(&c, &r, "validator", hostile()).await;
        eprintln!(
            "RESULT malicious always-{attack}: HTTP {got} in {:.1} ms, RSS {:+.1} MiB: {}",
            t.elapsed().as_secs_f64() * 1e3,
            (rss(&r) - before) as f64 / 1048576.0,
            body["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect::<String>()
        );
        assert_eq!(got, 422, "{attack}: {body}");
        // The built-in is still active and jobs run.
        let v: Value = runsync(&c, &r, "a portrait").await;
        assert_eq!(v["status"], "COMPLETED", "{v}");
        r.shutdown().await;
    }
}

/// The hostile module activated, then a restart with settings under which it fails its start:
/// the built-in stands in, the worker serves, and `/readyz` says so without calling the
/// worker unready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_fails_its_start_is_stood_in_for_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let r = serve(test_config(dir.path())).await;
    activate_hostile(&c, &r).await;
    r.shutdown().await;

    let mut cfg = test_config(dir.path());
    cfg.policies
        .validator
        .custom
        .insert("always".into(), "loop".into());
    cfg.policies.validator.deadline_ms = 200;
    let r = serve(cfg).await;
    let ready = c.get(api(&r, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    let warning = ready["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("validator policy") && warning.contains("does not load"),
        "{ready}"
    );
    assert!(ready["policies"][0]["fallback"].is_string(), "{ready}");
    let v: Value = runsync(&c, &r, "a portrait").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    r.shutdown().await;
}

/// Under fail_open a failing validator leaves the decision to the built-in rules: the job
/// record says so beside the version it called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_fallback_is_recorded_with_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.policies.validator.on_error = headshot_host::policy::OnError::FailOpen;
    let r = serve(cfg).await;
    let c = client();
    activate_hostile(&c, &r).await;
    for (prompt, fell_back) in [("attack:trap", true), ("a portrait", false)] {
        let v: Value = runsync(&c, &r, prompt).await;
        assert_eq!(v["status"], "COMPLETED", "{v}");
        let id = v["id"].as_str().unwrap();
        let job = get_admin_json(&c, admin(&r, &format!("/admin/jobs/{id}"))).await;
        let policies = &job["job"]["policies"];
        assert!(policies["validator"].is_string(), "{job}");
        assert_eq!(
            policies["validator_fallback"].is_string(),
            fell_back,
            "{prompt}: {job}"
        );
    }
    r.shutdown().await;
}
