//! Runs the real `headshot serve` binary as a child process, for tests that kill it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// Starts `headshot serve` on free ports with its data in `data`; returns the process and the
/// local API's base URL from the address line it prints.
pub fn spawn_serve(data: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_headshot"))
        .arg("--data-dir")
        .arg(data)
        .args(["serve", "--port", "0", "--admin-port", "0"])
        .env("HEADSHOT_LOG", "error")
        .env("HEADSHOT__SERVER__ADMIN_TOKEN", "process-test-token-0123")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("headshot serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address line");
    let v: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("the worker did not start cleanly ({e}): {line:?}"));
    (child, v["api"].as_str().expect("api").to_string())
}

/// The JSON answer of a GET to `url` (the tests' blocking client).
pub fn get_json(c: &reqwest::blocking::Client, url: &str) -> Value {
    c.get(url)
        .send()
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}
