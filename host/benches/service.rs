//! Host overhead per job through the local API: `cargo bench -p headshot-host --bench service`.
//!
//! Runs demo jobs one after another with `/runsync` over real HTTP (real sled, wasm policies,
//! local storage) and reports, per job, the client-measured latency, the model's generate
//! time as recorded in the job, and their difference — everything the worker adds around the
//! model (HTTP, acceptance flush, validate, sanitize, admit, store, sign, completion flush).

use std::time::{Duration, Instant};

mod common;

use headshot_host::ingress::server::start;
use serde_json::{Value, json};

fn pct(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    common::tune_allocator();
    let quick =
        std::env::var("HEADSHOT_BENCH_QUICK").is_ok() || std::env::args().any(|a| a == "--quick");
    let n = if quick { 50 } else { 300 };
    let rt = common::runtime();
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = common::config(dir.path());
        let running = start(config).await.expect("server");
        let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        let url = format!("http://{}/v2/local/runsync", running.api_addr);
        let body = |i: usize| json!({ "input": { "prompt": format!("a portrait of person {i}"), "user_id": "bench-user", "width": 64, "height": 64 } });
        for i in 0..10 {
            let _ = c.post(&url).json(&body(i)).send().await.expect("warmup");
        }
        let (mut total, mut generate, mut overhead) = (Vec::new(), Vec::new(), Vec::new());
        let mut stage: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for i in 0..n {
            let t = Instant::now();
            let v: Value = c.post(&url).json(&body(1000 + i)).send().await.expect("send").json().await.expect("json");
            let ms = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(v["status"], "COMPLETED", "{v}");
            let id = v["id"].as_str().expect("id");
            let rec = running.service.jobs().get(id).expect("get").expect("record");
            let gen_ms = rec.timings.get("generate_ms").copied().unwrap_or(0.0);
            for (k, val) in &rec.timings {
                stage.entry(k.clone()).or_default().push(*val);
            }
            total.push(ms);
            generate.push(gen_ms);
            overhead.push(ms - gen_ms);
        }
        println!("machine: {} cores, demo model 64x64, local storage, n={n}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        println!("RESULT job_total: p50 {:.2} ms (p99 {:.2} ms)", pct(total.clone(), 0.5), pct(total, 0.99));
        println!("RESULT job_generate: p50 {:.2} ms (p99 {:.2} ms)", pct(generate.clone(), 0.5), pct(generate, 0.99));
        println!("RESULT host_overhead_per_job: p50 {:.2} ms (p99 {:.2} ms)", pct(overhead.clone(), 0.5), pct(overhead, 0.99));
        for (k, v) in stage {
            if k.ends_with("_ms") && k != "total_ms" && k != "generate_ms" && k != "denoise_ms" {
                println!("INFO stage {k}: p50 {:.3} ms (p99 {:.3} ms)", pct(v.clone(), 0.5), pct(v, 0.99));
            }
        }
        running.shutdown().await;
    });
}
