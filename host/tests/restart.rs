//! Crash recovery with the real binary: jobs accepted by `headshot serve`, the process killed
//! with SIGKILL, a new process on the same data dir completes every accepted job.

#[path = "support/process.rs"]
mod process;

use std::time::{Duration, Instant};

use process::{get_json, spawn_serve};

use serde_json::{Value, json};

#[test]
fn jobs_accepted_before_a_sigkill_complete_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (mut child, api) = spawn_serve(dir.path());
    let mut ids = Vec::new();
    for i in 0..4 {
        let body = json!({ "id": format!("crash-{i}"), "input": { "prompt": format!("portrait {i}"), "user_id": "u1", "width": 256, "height": 256, "steps": 20 } });
        let v: Value = c
            .post(format!("{}/v2/local/run", api))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["status"], "IN_QUEUE");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // Kill the moment the first job is seen running, before any progress may have been
    // flushed: its start must already be on disk. (20 steps at 256² take seconds on the CPU,
    // polled every 2 ms: seen done first, the test could not tell a retry, and says so.)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = get_json(&c, &format!("{}/v2/local/status/crash-0", api));
        match v["status"].as_str() {
            Some("IN_QUEUE") => {}
            Some("IN_PROGRESS") => break,
            _ => panic!("crash-0 was not seen running before it ended: {v}"),
        }
        assert!(Instant::now() < deadline, "crash-0 never started: {v}");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (mut child, api) = spawn_serve(dir.path());
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let v: Value = get_json(&c, &format!("{}/v2/local/status/{id}", api));
            match v["status"].as_str() {
                Some("COMPLETED") => break,
                Some("FAILED" | "CANCELLED") => panic!("{id}: {v}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "{id} never completed: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The interrupted run counts as a retry.
    let health: Value = get_json(&c, &format!("{}/v2/local/health", api));
    assert_eq!(health["jobs"]["retried"], 1, "{health}");
    // Each image exists exactly once under its job key.
    for id in &ids {
        let files: Vec<_> = std::fs::read_dir(dir.path().join("images/u1").join(id))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1, "{id}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
