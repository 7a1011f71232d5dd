//! Crash loop: `headshot serve` is killed with SIGKILL at random moments while jobs arrive,
//! then restarted on the same data dir. At the end every acknowledged job is COMPLETED, each
//! image exists exactly once, and sled opened cleanly every time.
//!
//! Short mode (CI): 10 kills. Long mode: `HEADSHOT_CRASH_KILLS=100 cargo test --release
//! --test crash_loop -- --nocapture`.

#[path = "support/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use process::{get_json, spawn_serve};

use serde_json::{Value, json};

#[test]
fn every_acknowledged_job_completes_exactly_once_across_sigkills() {
    let kills: usize = std::env::var("HEADSHOT_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut acknowledged = BTreeSet::new();
    let mut next = 0;
    for round in 0..kills {
        let (mut child, api) = spawn_serve(dir.path());
        let deadline = Instant::now() + Duration::from_millis(50 + rand(500));
        let mut this_round = 0;
        while Instant::now() < deadline && this_round < 4 {
            this_round += 1;
            let id = format!("job-{next}");
            next += 1;
            let num = 1 + rand(2);
            let body = json!({ "id": id, "input": { "prompt": format!("portrait {id}"), "user_id": "crash", "width": 64, "height": 64, "num_images": num } });
            match c
                .post(format!("{api}/v2/local/run"))
                .json(&body)
                .send()
                .and_then(|r| r.json::<Value>())
            {
                Ok(v) if v["status"] == "IN_QUEUE" => {
                    acknowledged.insert(id);
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(rand(40)));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        eprintln!("round {round}: {} acknowledged so far", acknowledged.len());
    }
    // A last run finishes everything that was accepted.
    let (mut child, api) = spawn_serve(dir.path());
    let until = Instant::now() + Duration::from_secs(300);
    for id in &acknowledged {
        loop {
            let v: Value = get_json(&c, &format!("{api}/v2/local/status/{id}"));
            match v["status"].as_str() {
                Some("COMPLETED") => {
                    let images = v["output"]["images"].as_array().unwrap();
                    let files: Vec<_> = std::fs::read_dir(dir.path().join("images/crash").join(id))
                        .unwrap()
                        .collect();
                    assert_eq!(files.len(), images.len(), "{id}: every image exactly once");
                    break;
                }
                Some("FAILED" | "CANCELLED") => panic!("{id}: {v}"),
                _ => {}
            }
            assert!(Instant::now() < until, "{id} never completed: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let health: Value = get_json(&c, &format!("{api}/v2/local/health"));
    eprintln!(
        "after {kills} kills: {} jobs acknowledged, health {health}",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() >= kills,
        "too few jobs were accepted to mean anything"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
