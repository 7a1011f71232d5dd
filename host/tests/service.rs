//! The worker as a client sees it: real HTTP to `headshot serve` in-process, real sled files,
//! the built-in wasm policies, the demo model, local storage.

#[path = "support/server.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runsync_returns_a_signed_url_whose_download_is_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let v: Value = post_json(&c, api(&r, "/v2/local/runsync"), &json!({ "input": { "prompt": "a founder in a navy blazer", "user_id": "user-1", "width": 64, "height": 64, "style": "corporate", "num_images": 2 } })).await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    let images = v["output"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert!(v["output"]["seed"].as_u64().is_some());
    // The corporate template makes the prompt longer than the demo CLIP's window: the cut is
    // in the answer, not only in the log.
    let cut = &v["output"]["prompt_truncated_tokens"];
    assert!(cut["clip"].as_u64().unwrap() > 0, "{cut}");
    assert!(cut["t5"].as_u64().is_some(), "{cut}");
    let short = runsync(&c, &r, "a cat").await;
    assert_eq!(
        short["output"]["prompt_truncated_tokens"]["clip"], 0,
        "{short}"
    );
    let url = images[0]["url"].as_str().unwrap();
    let resp = c.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    // A tampered signature or path is refused.
    let tampered = url.replace("sig=", "sig=00");
    assert_eq!(c.get(&tampered).send().await.unwrap().status(), 403);
    let other = url.replace("/0.png", "/1.png");
    assert_eq!(c.get(&other).send().await.unwrap().status(), 403);
    let unsigned = url.split('?').next().unwrap();
    assert_eq!(c.get(unsigned).send().await.unwrap().status(), 403);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_then_status_moves_through_queue_progress_and_completion() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    // A slower job first, so the second one is seen waiting.
    let mut slow = input("a slow portrait", 256);
    slow["steps"] = json!(30);
    let first: Value = post_json(&c, api(&r, "/v2/local/run"), &json!({ "input": slow })).await;
    assert_eq!(first["status"], "IN_QUEUE");
    let second: Value = post_json(
        &c,
        api(&r, "/run"),
        &json!({ "input": input("a second portrait", 64) }),
    )
    .await;
    let (a, b) = (
        first["id"].as_str().unwrap().to_string(),
        second["id"].as_str().unwrap().to_string(),
    );

    let mut seen_a = Vec::new();
    let mut progress_seen = false;
    let start = Instant::now();
    loop {
        let v: Value = get_json(&c, api(&r, &format!("/v2/local/status/{a}"))).await;
        let s = v["status"].as_str().unwrap().to_string();
        if s == "IN_PROGRESS" && v["output"]["step"].as_u64().is_some() {
            progress_seen = true;
            let vb: Value = get_json(&c, api(&r, &format!("/status/{b}"))).await;
            // One job at a time: while the first is still running (read again after the second,
            // since it may finish in between), the second waits.
            let again: Value = get_json(&c, api(&r, &format!("/v2/local/status/{a}"))).await;
            if again["status"] == "IN_PROGRESS" {
                assert_eq!(vb["status"], "IN_QUEUE", "{vb}");
            }
        }
        if seen_a.last() != Some(&s) {
            seen_a.push(s.clone());
        }
        if s == "COMPLETED" || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        seen_a.last().map(String::as_str),
        Some("COMPLETED"),
        "{seen_a:?}"
    );
    assert!(
        progress_seen,
        "never saw IN_PROGRESS with a step: {seen_a:?}"
    );

    // The stream hands every chunk out once.
    let s1: Value = get_json(&c, api(&r, &format!("/v2/local/stream/{a}"))).await;
    let chunks = s1["stream"].as_array().unwrap().len();
    let s2: Value = get_json(&c, api(&r, &format!("/v2/local/stream/{a}"))).await;
    assert!(
        s2["stream"].as_array().unwrap().is_empty(),
        "chunks were handed out twice"
    );
    assert!(chunks <= 30);
    let vb = wait_done(&c, &r, &b).await;
    assert_eq!(vb["status"], "COMPLETED");

    let health: Value = get_json(&c, api(&r, "/v2/local/health")).await;
    assert_eq!(health["jobs"]["completed"], 2, "{health}");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_queued_and_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let mut long = input("a long portrait", 256);
    long["steps"] = json!(50);
    let running: Value = post_json(&c, api(&r, "/v2/local/run"), &json!({ "input": long })).await;
    let queued: Value = post_json(
        &c,
        api(&r, "/v2/local/run"),
        &json!({ "input": input("queued", 64) }),
    )
    .await;
    let (run_id, queue_id) = (
        running["id"].as_str().unwrap(),
        queued["id"].as_str().unwrap(),
    );

    let v: Value = c
        .post(api(&r, &format!("/v2/local/cancel/{queue_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "CANCELLED");
    // Wait until the long one runs, then cancel it.
    for _ in 0..400 {
        let v: Value = get_json(&c, api(&r, &format!("/v2/local/status/{run_id}"))).await;
        if v["status"] == "IN_PROGRESS" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let v: Value = c
        .post(api(&r, &format!("/v2/local/cancel/{run_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "CANCELLED");
    let done = wait_done(&c, &r, run_id).await;
    assert_eq!(done["status"], "CANCELLED", "{done}");
    assert_eq!(job_error(&done)["error_type"], "cancelled");
    let q = wait_done(&c, &r, queue_id).await;
    assert_eq!(q["status"], "CANCELLED");
    // The worker carries on.
    let v: Value = runsync(&c, &r, "after cancel").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    let unknown = c
        .post(api(&r, "/v2/local/cancel/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    // Both cancellations count, the queued one too: /metrics agrees with /health.
    let metrics = metrics(&c, &r).await;
    let needle = "headshot_job_errors_total{error_type=\"cancelled\"} 2";
    assert!(metrics.contains(needle), "{needle} not in {metrics}");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_racing_the_dispatcher_end_each_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let mut ids = Vec::new();
    for i in 0..24 {
        let mut inp = input(&format!("race {i}"), 64);
        inp["steps"] = json!(1);
        let v: Value = post_json(&c, api(&r, "/v2/local/run"), &json!({ "input": inp })).await;
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // Every cancel at once, while the dispatcher takes the queue's head.
    let cancels = ids.iter().map(|id| {
        let (c, url) = (c.clone(), api(&r, &format!("/v2/local/cancel/{id}")));
        tokio::spawn(async move { c.post(url).send().await.unwrap().status() })
    });
    for h in cancels.collect::<Vec<_>>() {
        assert_eq!(h.await.unwrap(), 200);
    }
    let mut ended = std::collections::BTreeMap::new();
    for id in &ids {
        let v = wait_done(&c, &r, id).await;
        *ended
            .entry(v["status"].as_str().unwrap().to_string())
            .or_insert(0u64) += 1;
    }
    let health: Value = get_json(&c, api(&r, "/v2/local/health")).await;
    let metrics = metrics(&c, &r).await;
    let cancelled = ended.get("CANCELLED").copied().unwrap_or(0);
    assert!(cancelled > 0, "{ended:?}");
    // A job the cancel lost to ran to its end: completed, never failed by the race.
    assert!(
        ended.keys().all(|s| s == "COMPLETED" || s == "CANCELLED"),
        "{ended:?}"
    );
    assert_eq!(health["jobs"]["cancelled"], cancelled, "{health} {ended:?}");
    assert_eq!(
        health["jobs"]["completed"],
        ended.get("COMPLETED").copied().unwrap_or(0),
        "{health} {ended:?}"
    );
    let line = format!("headshot_job_errors_total{{error_type=\"cancelled\"}} {cancelled}\n");
    assert!(metrics.contains(&line), "{line} not in {metrics}");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_job_id_returns_the_recorded_result_without_generating_again() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let body = json!({ "id": "order-42", "input": input("a chef", 64) });
    let first: Value = post_json(&c, api(&r, "/v2/local/runsync"), &body).await;
    assert_eq!(first["status"], "COMPLETED", "{first}");
    let second: Value = post_json(&c, api(&r, "/v2/local/runsync"), &body).await;
    assert_eq!(second["output"], first["output"]);
    let third: Value = post_json(&c, api(&r, "/v2/local/run"), &body).await;
    assert_eq!(third["status"], "COMPLETED");
    let job: Value = get_admin_json(&c, admin(&r, "/admin/jobs/order-42")).await;
    assert_eq!(job["job"]["attempts"], 1, "{job}");
    let files: Vec<_> = std::fs::read_dir(dir.path().join("images/user-1/order-42"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1);

    // The same id with another input (another user's job, say) is refused by name on both
    // routes, and the answer carries nothing of the recorded job.
    let mut other = input("a dog", 64);
    other["user_id"] = json!("user-2");
    for route in ["/v2/local/runsync", "/v2/local/run"] {
        let resp = c
            .post(api(&r, route))
            .json(&json!({ "id": "order-42", "input": other }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 422, "{route}");
        let text = resp.text().await.unwrap();
        let err: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(err["error_type"], "validation_error", "{err}");
        assert_eq!(err["details"]["fields"][0]["field"], "/id", "{err}");
        assert_eq!(err["details"]["fields"][0]["code"], "id_reused", "{err}");
        for recorded in ["user-1", "a chef", "png", "sig="] {
            assert!(!text.contains(recorded), "{route} leaks {recorded}: {text}");
        }
    }
    let job: Value = get_admin_json(&c, admin(&r, "/admin/jobs/order-42")).await;
    assert_eq!(job["job"]["input"]["prompt"], "a chef", "{job}");
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_field_level_errors_and_nothing_reaches_storage() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let cases = [
        (
            json!({ "prompt": "a portrait", "user_id": "user-1", "width": 100, "height": 64 }),
            "/input/width",
        ),
        (
            json!({ "prompt": "a portrait", "user_id": "../../etc", "width": 64, "height": 64 }),
            "/input/user_id",
        ),
        (
            json!({ "prompt": "a portrait", "user_id": "a/b", "width": 64, "height": 64 }),
            "/input/user_id",
        ),
        (
            json!({ "prompt": "n.u.d.e portrait", "user_id": "user-1", "width": 64, "height": 64 }),
            "/input/prompt",
        ),
        (json!({ "user_id": "user-1" }), "/input/prompt"),
        (
            json!({ "prompt": "p", "user_id": "user-1", "colour": "red" }),
            "/input/colour",
        ),
    ];
    for (inp, field) in cases {
        let v: Value = post_json(&c, api(&r, "/v2/local/runsync"), &json!({ "input": inp })).await;
        assert_eq!(v["status"], "FAILED", "{v}");
        let err = job_error(&v);
        assert_eq!(err["error_type"], "validation_error", "{err}");
        let fields: Vec<&str> = err["details"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "{field} not in {fields:?}");
    }
    assert!(!dir.path().join("etc").exists());
    assert!(
        !dir.path().join("images").exists()
            || std::fs::read_dir(dir.path().join("images"))
                .unwrap()
                .count()
                == 0
    );

    // Bodies that are not jobs are refused before anything is stored.
    let resp = c
        .post(api(&r, "/v2/local/run"))
        .json(&json!({ "input": "not an object" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let resp = c
        .post(api(&r, "/v2/local/run"))
        .json(&json!({ "inputs": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert!(err["message"].as_str().unwrap().contains("inputs"), "{err}");
    let resp = c
        .post(api(&r, "/v2/local/run"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let huge = json!({ "input": { "prompt": "x".repeat(2 << 20), "user_id": "u" } });
    let resp = c
        .post(api(&r, "/v2/local/run"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["connection"], "close");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error_type"], "validation_error");
    let resp = c.get(api(&r, "/nope")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.json::<Value>().await.unwrap()["message"].is_string());
    // A malformed query string and a wrong method get the JSON error too, not axum's text.
    let resp = c
        .post(api(&r, "/v2/local/runsync?wait=abc"))
        .json(&json!({ "input": input("a portrait", 64) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["details"]["fields"][0]["field"], "?wait", "{err}");
    let resp = c.get(api(&r, "/v2/local/run")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error_type"], "validation_error", "{err}");
    let resp = c
        .get(api(&r, "/v2/local/status/unknown-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_the_token_on_every_route_and_answers_history_queries() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let routes = [
        ("GET", "/admin/policies"),
        ("POST", "/admin/policies/validator"),
        ("GET", "/admin/policies/validator/history"),
        ("POST", "/admin/policies/validator/activate/abc"),
        ("POST", "/admin/policies/validator/rollback"),
        ("GET", "/admin/jobs"),
        ("GET", "/admin/jobs/x"),
        ("GET", "/admin/breakers"),
        ("POST", "/admin/breakers/storage/reset"),
        ("POST", "/admin/breakers/storage/force-open"),
        ("GET", "/admin/model"),
        ("POST", "/admin/model/reload"),
        ("GET", "/admin/resources"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/no-such-route"),
    ];
    for (method, path) in routes {
        for token in [
            None,
            Some("wrong"),
            Some("test-admin-token-0123456789X"),
            Some(""),
        ] {
            let mut req = c.request(method.parse().unwrap(), admin(&r, path));
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{method} {path} with {token:?}");
        }
    }
    for i in 0..3 {
        let mut inp = input("a portrait", 64);
        inp["user_id"] = json!(if i == 0 { "alice" } else { "bob" });
        let v: Value = post_json(&c, api(&r, "/runsync"), &json!({ "input": inp })).await;
        assert_eq!(v["status"], "COMPLETED");
    }
    let bad: Value = post_json(
        &c,
        api(&r, "/runsync"),
        &json!({ "input": { "user_id": "bob" } }),
    )
    .await;
    assert_eq!(bad["status"], "FAILED");
    let all = get_admin_json(&c, admin(&r, "/admin/jobs?limit=2")).await;
    assert_eq!(all["jobs"].as_array().unwrap().len(), 2);
    let cursor = all["next_cursor"].as_str().unwrap().to_string();
    let rest = get_admin_json(
        &c,
        admin(&r, &format!("/admin/jobs?limit=2&cursor={cursor}")),
    )
    .await;
    assert_eq!(rest["jobs"].as_array().unwrap().len(), 2);
    assert!(rest["next_cursor"].is_null());
    // A cursor the API did not hand out, an unknown or malformed parameter, or a wrong method
    // is a JSON 422/405 naming it, not a first page, an empty one, or axum's plain text.
    for (query, field) in [
        ("cursor=zz", "?cursor"),
        ("cursor=00", "?cursor"),
        ("cursor=", "?cursor"),
        ("limit=abc", "?limit"),
        ("since_ms=-1", "?since_ms"),
    ] {
        let resp = admin_get(&c, &r, &format!("/admin/jobs?{query}")).await;
        assert_eq!(resp.status(), 422, "{query}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(
            err["details"]["fields"][0]["field"], field,
            "{query}: {err}"
        );
    }
    let resp = admin_get(&c, &r, "/admin/jobs?foo=bar").await;
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert!(err["message"].as_str().unwrap().contains("foo"), "{err}");
    let resp = admin_get(&c, &r, "/admin/breakers/storage/reset").await;
    assert_eq!(resp.status(), 405);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error_type"],
        "validation_error"
    );
    let bobs = get_admin_json(&c, admin(&r, "/admin/jobs?user_id=bob")).await;
    assert_eq!(bobs["jobs"].as_array().unwrap().len(), 3);
    let failed = get_admin_json(&c, admin(&r, "/admin/jobs?status=FAILED")).await;
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(failed["jobs"][0]["error"]["error_type"], "validation_error");
    let one = &all["jobs"][0]["id"];
    let job = get_admin_json(
        &c,
        admin(&r, &format!("/admin/jobs/{}", one.as_str().unwrap())),
    )
    .await;
    assert!(
        job["job"]["timings"]["total_ms"].as_f64().is_some(),
        "{job}"
    );
    let metrics = metrics(&c, &r).await;
    for needle in [
        "headshot_jobs{status=\"completed\"} 3",
        "headshot_job_stage_milliseconds_count{stage=\"generate\"} 3",
        "headshot_job_errors_total{error_type=\"validation_error\"} 1",
        "headshot_policy_call_microseconds_count{slot=\"validator\",sha256=\"",
        "headshot_policy_calls_total{slot=\"validator\",sha256=\"",
        "headshot_memory_bytes{kind=\"process_rss\"}",
        "headshot_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "{needle} not in {metrics}");
    }
    // Every family announces its type (and, but for the GPU readings, its help).
    for (family, kind) in [
        ("headshot_jobs", "gauge"),
        ("headshot_jobs_retried_total", "counter"),
        ("headshot_queue_depth", "gauge"),
        ("headshot_model_loaded", "gauge"),
        ("headshot_policy_calls_total", "counter"),
        ("headshot_policy_failures_total", "counter"),
        ("headshot_breaker_open", "gauge"),
        ("headshot_job_stage_milliseconds", "summary"),
        ("headshot_job_errors_total", "counter"),
        ("headshot_policy_call_microseconds", "summary"),
        ("headshot_memory_bytes", "gauge"),
        ("headshot_model_load_failures_total", "counter"),
    ] {
        let header = format!("# TYPE {family} {kind}\n");
        assert!(metrics.contains(&header), "{header} not in {metrics}");
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "{family}: {metrics}"
        );
    }
    let policies = get_admin_json(&c, admin(&r, "/admin/policies")).await;
    assert_eq!(policies["slots"].as_array().unwrap().len(), 3);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_swapped_through_the_admin_api_while_jobs_run_fails_no_job() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let example = std::fs::read(env!("HEADSHOT_EXAMPLE_VALIDATOR_WASM")).unwrap();
    let api_url = api(&r, "/v2/local/runsync");
    let client_task = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..12 {
                let v: Value = post_json(
                    &c,
                    &api_url,
                    &json!({ "input": input(&format!("portrait {i}"), 64) }),
                )
                .await;
                statuses.push(v);
            }
            statuses
        })
    };
    let builtin_sha = active_validator_sha(&c, &r).await;
    for i in 0..4 {
        let resp = swap_validator(&c, &r, i, &example, &builtin_sha).await;
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let statuses = client_task.await.unwrap();
    for v in &statuses {
        assert_eq!(v["status"], "COMPLETED", "{v}");
    }
    // Refusals through the admin API say why and change nothing.
    let resp = c
        .post(admin(&r, "/admin/policies/validator"))
        .bearer_auth(ADMIN_TOKEN)
        .body("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly component"),
        "{err}"
    );
    let resp = admin_post(&c, &r, "/admin/policies/validator/rollback").await;
    assert!(resp.status().is_success());
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_output_and_openapi_documents() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.server.output = headshot_host::config::OutputMode::Base64;
    let r = serve(cfg).await;
    let c = client();
    let v: Value = runsync(&c, &r, "inline").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    let b64 = v["output"]["images"][0]["base64"].as_str().unwrap();
    assert!(
        b64.starts_with("iVBORw0KGgo"),
        "a base64 PNG: {}",
        &b64[..16]
    );
    assert!(
        !dir.path().join("images").exists()
            || std::fs::read_dir(dir.path().join("images"))
                .unwrap()
                .count()
                == 0
    );
    let doc: Value = get_json(&c, api(&r, "/openapi.json")).await;
    assert!(doc["paths"]["/v2/{endpoint}/runsync"].is_object());
    let doc: Value = get_admin_json(&c, admin(&r, "/openapi.json")).await;
    // Every route of the admin router (admin.rs) is documented.
    for path in [
        "/admin/policies",
        "/admin/policies/{kind}",
        "/admin/policies/{kind}/history",
        "/admin/policies/{kind}/activate/{sha256}",
        "/admin/policies/{kind}/rollback",
        "/admin/jobs",
        "/admin/jobs/{id}",
        "/admin/breakers",
        "/admin/breakers/{name}/reset",
        "/admin/breakers/{name}/force-open",
        "/admin/model",
        "/admin/model/reload",
        "/admin/resources",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not in {doc}");
    }
    let ready = c.get(api(&r, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    r.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_can_be_failed_with_a_reason_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = headshot_host::state::StateDb::open(&dir.path().join("state")).unwrap();
        db.jobs()
            .unwrap()
            .accept("left-behind", input("x", 64), now_ms())
            .unwrap()
            .unwrap();
        db.flush().unwrap();
    }
    let mut cfg = test_config(dir.path());
    cfg.jobs.on_restart = headshot_host::config::OnRestart::Fail;
    let r = serve(cfg).await;
    let c = client();
    let v: Value = get_json(&c, api(&r, "/v2/local/status/left-behind")).await;
    assert_eq!(v["status"], "FAILED", "{v}");
    assert!(
        job_error(&v)["message"]
            .as_str()
            .unwrap()
            .contains("on_restart")
    );
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_failing_mid_way_fails_that_job_only() {
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    r.service
        .inference()
        .inject_fault(headshot_host::jobs::inference::InjectedFault {
            after_step: 2,
            message: "kernel launch failed (injected)".into(),
            ..Default::default()
        });
    let mut inp = input("fails at step 2", 64);
    inp["steps"] = json!(4);
    let v: Value = post_json(&c, api(&r, "/runsync"), &json!({ "input": inp })).await;
    assert_eq!(v["status"], "FAILED", "{v}");
    let err = job_error(&v);
    assert_eq!(err["error_type"], "generation_error", "{err}");
    assert!(err["message"].as_str().unwrap().contains("injected"));
    let v: Value = runsync(&c, &r, "the next one").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    // An injected OOM becomes a retryable resource_exhausted, and the model reloads.
    r.service
        .inference()
        .inject_fault(headshot_host::jobs::inference::InjectedFault {
            after_step: 1,
            message: "CUDA out of memory (injected)".into(),
            ..Default::default()
        });
    let v: Value = runsync(&c, &r, "oom").await;
    let err = job_error(&v);
    assert_eq!(err["error_type"], "resource_exhausted", "{err}");
    assert_eq!(err["retryable"], true);
    let v: Value = runsync(&c, &r, "after oom").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    assert!(
        r.service.inference().state().loads >= 2,
        "the pipeline was reloaded after the OOM"
    );
    // A panic inside generation (a bug in a kernel wrapper or a library) fails that job
    // with an internal error; the inference thread lives on and reloads the model.
    let loads = r.service.inference().state().loads;
    r.service
        .inference()
        .inject_fault(headshot_host::jobs::inference::InjectedFault {
            after_step: 1,
            message: "index out of bounds (injected panic)".into(),
            panic: true,
        });
    let v: Value = runsync(&c, &r, "panics").await;
    assert_eq!(v["status"], "FAILED", "{v}");
    let err = job_error(&v);
    assert_eq!(err["error_type"], "internal", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("panicked"),
        "{err}"
    );
    assert_eq!(
        err["details"]["panic"], "index out of bounds (injected panic)",
        "{err}"
    );
    assert!(
        !r.service.inference().state().loaded,
        "the pipeline was dropped"
    );
    let v: Value = runsync(&c, &r, "after the panic").await;
    assert_eq!(v["status"], "COMPLETED", "{v}");
    assert_eq!(r.service.inference().state().loads, loads + 1);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_a_request_that_does_not_fit_and_the_worker_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // Make any request look far bigger than this machine's free memory.
    cfg.resources.cpu_bytes_per_pixel = 1 << 30;
    let r = serve(cfg).await;
    let c = client();
    let v: Value = runsync(&c, &r, "too big").await;
    assert_eq!(v["status"], "FAILED", "{v}");
    let err = job_error(&v);
    assert_eq!(err["error_type"], "resource_exhausted", "{err}");
    assert_eq!(err["retryable"], true);
    assert_eq!(err["details"]["retry_after_ms"], 5000);
    assert_eq!(err["details"]["refusal"]["pool"], "system");
    assert!(
        err["message"].as_str().unwrap().contains("MiB free"),
        "{err}"
    );
    // Nothing was generated, and the worker still answers.
    assert_eq!(r.service.inference().state().loads, 0);
    assert_eq!(
        c.get(api(&r, "/healthz")).send().await.unwrap().status(),
        200
    );
    r.shutdown().await;
}

/// `jobs.stream_keep_finished` bounds the finished jobs whose undrained progress a late
/// `/stream` reader still gets: the older job's chunks are gone, the newest job's are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_stream_readers_get_only_the_jobs_the_ring_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.jobs.stream_keep_finished = 1;
    let r = serve(cfg).await;
    let c = client();
    let older = runsync(&c, &r, "older").await;
    let newer = runsync(&c, &r, "newer").await;
    assert_eq!(older["status"], "COMPLETED", "{older}");
    assert_eq!(newer["status"], "COMPLETED", "{newer}");
    let stream = |id: &Value| api(&r, &format!("/v2/local/stream/{}", id.as_str().unwrap()));
    let old_stream = get_json(&c, stream(&older["id"])).await;
    assert_eq!(old_stream["status"], "COMPLETED", "{old_stream}");
    assert!(
        old_stream["stream"].as_array().unwrap().is_empty(),
        "{old_stream}"
    );
    let new_stream = get_json(&c, stream(&newer["id"])).await;
    assert!(
        !new_stream["stream"].as_array().unwrap().is_empty(),
        "{new_stream}"
    );
    r.shutdown().await;
}
