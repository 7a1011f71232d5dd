//! Starts the whole worker in-process (real HTTP, real sled, real wasm, demo model) on free
//! ports, for whole-system tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use headshot_host::config::Config;
use headshot_host::ingress::server::{Running, start};
use serde_json::Value;

/// The admin token `test_config` sets.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A config for tests: demo model, free ports, data under `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.server.port = 0;
    c.server.admin_port = 0;
    c.server.admin_token = ADMIN_TOKEN.into();
    c.policies.prewarm = 2;
    // Roomy policy deadlines: CI runs these tests in parallel on two cores.
    c.policies.validator.deadline_ms = 1000;
    c.policies.sanitizer.deadline_ms = 1000;
    c.policies.resilience.deadline_ms = 1000;
    c
}

pub async fn serve(config: Config) -> Running {
    start(config).await.expect("server starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

pub fn api(r: &Running, path: &str) -> String {
    format!("http://{}{path}", r.api_addr)
}

pub fn admin(r: &Running, path: &str) -> String {
    format!("http://{}{path}", r.admin_addr)
}

pub fn input(prompt: &str, side: u32) -> Value {
    serde_json::json!({ "prompt": prompt, "user_id": "user-1", "width": side, "height": side })
}

/// Polls `/status` until the job is terminal.
pub async fn wait_done(c: &reqwest::Client, r: &Running, id: &str) -> Value {
    for _ in 0..1200 {
        let v = get_json(c, api(r, &format!("/v2/local/status/{id}"))).await;
        if matches!(
            v["status"].as_str(),
            Some("COMPLETED" | "FAILED" | "CANCELLED")
        ) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not finish");
}

/// The ErrorResponse carried in a FAILED job's `error` string.
pub fn job_error(v: &Value) -> Value {
    serde_json::from_str(v["error"].as_str().expect("error string")).expect("error is JSON")
}

/// POSTs `body` as JSON and returns the JSON answer.
pub async fn post_json<T: serde::Serialize + ?Sized>(
    c: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    body: &T,
) -> Value {
    json_answer(c.post(url).json(body)).await
}

/// Runs a 64×64 demo job for `prompt` through `/runsync` and returns the answer.
pub async fn runsync(c: &reqwest::Client, r: &Running, prompt: &str) -> Value {
    post_json(
        c,
        api(r, "/v2/local/runsync"),
        &serde_json::json!({ "input": input(prompt, 64) }),
    )
    .await
}

/// The sha256 of the active validator, from the admin API.
pub async fn active_validator_sha(c: &reqwest::Client, r: &Running) -> String {
    let v = get_admin_json(c, admin(r, "/admin/policies")).await;
    v["slots"][0]["active"]["sha256"]
        .as_str()
        .expect("active validator sha256")
        .to_string()
}

/// Step `step` of a hot-swap loop: even steps push `example` (it becomes active), odd steps
/// activate `builtin_sha` again.
pub async fn swap_validator(
    c: &reqwest::Client,
    r: &Running,
    step: usize,
    example: &[u8],
    builtin_sha: &str,
) -> reqwest::Response {
    let req = if step.is_multiple_of(2) {
        c.post(admin(r, "/admin/policies/validator"))
            .body(example.to_vec())
    } else {
        c.post(admin(
            r,
            &format!("/admin/policies/validator/activate/{builtin_sha}"),
        ))
    };
    req.bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("swap request")
}

/// Sends `request` and returns the JSON answer.
async fn json_answer(request: reqwest::RequestBuilder) -> Value {
    request
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON answer")
}

/// GETs `url` and returns the JSON answer.
pub async fn get_json(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    json_answer(c.get(url)).await
}

/// GETs an admin API `url` with the test token and returns the JSON answer.
pub async fn get_admin_json(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    json_answer(c.get(url).bearer_auth(ADMIN_TOKEN)).await
}

/// A GET to the admin API's `path` with the test token, whatever its status.
pub async fn admin_get(c: &reqwest::Client, r: &Running, path: &str) -> reqwest::Response {
    c.get(admin(r, path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin request")
}

/// A POST without a body to the admin API's `path` with the test token, whatever its status.
pub async fn admin_post(c: &reqwest::Client, r: &Running, path: &str) -> reqwest::Response {
    c.post(admin(r, path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin request")
}

/// The Prometheus text of `/metrics`.
pub async fn metrics(c: &reqwest::Client, r: &Running) -> String {
    admin_get(c, r, "/metrics")
        .await
        .text()
        .await
        .expect("metrics text")
}
