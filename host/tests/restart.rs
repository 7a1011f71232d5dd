//! Crash recovery with the real binary: jobs accepted by `headshot serve`, the process killed
//! with SIGKILL, a new process on the same data dir completes every accepted job.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Worker {
    child: Child,
    api: String,
}

fn start(data: &Path) -> Worker {
    let mut child = Command::new(env!("CARGO_BIN_EXE_headshot"))
        .args(["--data-dir"])
        .arg(data)
        .args(["serve", "--port", "0", "--admin-port", "0"])
        .env("HEADSHOT_LOG", "warn")
        .env("HEADSHOT__SERVER__ADMIN_TOKEN", "restart-test-token-0123")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("headshot serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("address line");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    Worker {
        child,
        api: v["api"].as_str().expect("api").to_string(),
    }
}

#[test]
fn jobs_accepted_before_a_sigkill_complete_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut w = start(dir.path());
    let mut ids = Vec::new();
    for i in 0..4 {
        let body = json!({ "id": format!("crash-{i}"), "input": { "prompt": format!("portrait {i}"), "user_id": "u1", "width": 256, "height": 256, "steps": 20 } });
        let v: Value = c
            .post(format!("{}/v2/local/run", w.api))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["status"], "IN_QUEUE");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    w.child.kill().unwrap(); // SIGKILL
    w.child.wait().unwrap();

    let mut w = start(dir.path());
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let v: Value = c
                .get(format!("{}/v2/local/status/{id}", w.api))
                .send()
                .unwrap()
                .json()
                .unwrap();
            match v["status"].as_str() {
                Some("COMPLETED") => break,
                Some("FAILED" | "CANCELLED") => panic!("{id}: {v}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "{id} never completed: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Each image exists exactly once under its job key.
    for id in &ids {
        let files: Vec<_> = std::fs::read_dir(dir.path().join("images/u1").join(id))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1, "{id}");
    }
    w.child.kill().unwrap();
    w.child.wait().unwrap();
}
