//! Load with policy swaps: concurrent clients against the local API for a fixed time while the
//! validator is swapped through the admin API every second. Zero failed requests; latency
//! percentiles printed. Short in CI; `HEADSHOT_LOAD_SECS=60 HEADSHOT_LOAD_CLIENTS=8 cargo test
//! --release --test load -- --nocapture` for the long run.

#[path = "support/server.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_see_no_failure_while_policies_are_swapped_every_second() {
    let secs: u64 = std::env::var("HEADSHOT_LOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let clients: usize = std::env::var("HEADSHOT_LOAD_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let r = serve(test_config(dir.path())).await;
    let c = client();
    let example = std::fs::read(env!("HEADSHOT_EXAMPLE_VALIDATOR_WASM")).unwrap();
    let builtin_sha = active_validator_sha(&c, &r).await;
    let end = Instant::now() + Duration::from_secs(secs);

    let mut tasks = Vec::new();
    for n in 0..clients {
        let (c, url) = (c.clone(), api(&r, "/v2/local/runsync"));
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut latencies) = (0u32, Vec::new(), Vec::new());
            let mut i = 0;
            while Instant::now() < end {
                i += 1;
                let t = Instant::now();
                let resp = c
                    .post(&url)
                    .json(&json!({ "input": input(&format!("client {n} job {i}"), 64) }))
                    .send()
                    .await;
                let v: Value = match resp {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(e) => json!({ "status": "HTTP", "error": e.to_string() }),
                };
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                if v["status"] == "COMPLETED" {
                    ok += 1;
                } else {
                    failed.push(v);
                }
            }
            (ok, failed, latencies)
        }));
    }
    let mut swaps = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let resp = swap_validator(&c, &r, swaps, &example, &builtin_sha).await;
        assert!(
            resp.status().is_success(),
            "swap {swaps}: {}",
            resp.text().await.unwrap()
        );
        swaps += 1;
    }
    let (mut ok, mut failed, mut lat) = (0, Vec::new(), Vec::new());
    for t in tasks {
        let (o, f, l) = t.await.unwrap();
        ok += o;
        failed.extend(f);
        lat.extend(l);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "RESULT load: {clients} clients x {secs} s, {swaps} swaps: {ok} completed, {} failed; latency p50 {:.1} ms, p99 {:.1} ms",
        failed.len(),
        pct(0.5),
        pct(0.99)
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(2)]
    );
    assert!(swaps >= 2 && ok > 0);
    r.shutdown().await;
}
