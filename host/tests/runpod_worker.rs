//! The Runpod worker protocol against an in-process fake job server over real HTTP, with the
//! demo model behind the handler (ref/runpod.md §5 conformance checks).

#[path = "support/fake_runpod.rs"]
mod fake_runpod;
#[path = "support/server.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use fake_runpod::{FakeRunpod, TakeAnswer};
use headshot_host::ingress::runpod::{RunpodEnv, Worker, WorkerExit, WorkerOptions};
use headshot_host::ingress::server::{open_service, open_state};
use headshot_host::jobs::JobService;
use serde_json::{Value, json};
use tokio::sync::watch;

fn opts() -> WorkerOptions {
    WorkerOptions {
        backoff_429: Duration::from_millis(400),
        backoff_error: Duration::from_millis(30),
        poll_timeout: Duration::from_secs(5),
        done_retry_delays: vec![Duration::from_millis(50), Duration::from_millis(50)],
        stop_poll_interval: Duration::from_millis(100),
        progress_interval: Duration::from_millis(20),
        ..WorkerOptions::default()
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    fake: FakeRunpod,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<WorkerExit>,
    service: JobService,
}

async fn start(o: WorkerOptions) -> Harness {
    let fake = FakeRunpod::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = support::test_config(dir.path());
    let (state, registry) = open_state(&cfg).await.unwrap();
    let service = open_service(cfg, &state, registry, "http://127.0.0.1:1".into()).unwrap();
    let vars = fake.vars();
    let env = RunpodEnv::from_vars(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        .unwrap();
    let worker = Worker::new(env, o, service.clone()).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move { worker.run(rx).await });
    Harness {
        _dir: dir,
        fake,
        stop,
        task,
        service,
    }
}

impl Harness {
    async fn finish(self) -> (FakeRunpod, WorkerExit) {
        self.stop.send_replace(true);
        let exit = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap();
        self.service.stop().await;
        (self.fake, exit)
    }
}

fn job(id: &str, prompt: &str, side: u32, steps: u32) -> Value {
    json!({ "id": id, "input": { "prompt": prompt, "user_id": "u1", "width": side, "height": side, "steps": steps }, "webhook": null, "extra": "kept" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_posts_results_and_progress_in_order_with_heartbeats_and_no_overtaking() {
    let h = start(opts()).await;
    for a in [
        TakeAnswer::Status(204),
        TakeAnswer::Status(400),
        TakeAnswer::Raw("text/html", "<html>"),
        TakeAnswer::Raw("application/json", ""),
        TakeAnswer::Job(json!({ "id": "noinput" })),
        TakeAnswer::Status(500),
    ] {
        h.fake.push_take(a);
    }
    h.fake
        .push_take(TakeAnswer::Job(job("j1", "a ünïcode portrait ✓", 128, 12)));
    h.fake
        .push_take(TakeAnswer::Job(job("j2", "a second portrait", 64, 4)));
    h.fake.wait_for_results(&["j1", "j2"]).await;
    let (fake, exit) = h.finish().await;
    assert_eq!(exit, WorkerExit::Shutdown);

    // 1. Take URL and auth.
    let takes = fake.seen_path("/job-take/");
    assert_eq!(takes[0].path, "/v2/ep/job-take/w1");
    assert_eq!(takes[0].query, "gpu=T&job_in_progress=0");
    assert_eq!(takes[0].header("authorization").as_deref(), Some("k"));

    // 3. Success result.
    let done = &fake.finals("j1")[0];
    assert_eq!(done.method, "POST");
    assert_eq!(done.query, "gpu=T&isStream=false");
    assert_eq!(done.header("x-request-id").as_deref(), Some("j1"));
    assert_eq!(done.header("authorization").as_deref(), Some("k"));
    let body = done.json();
    assert!(body["output"]["images"][0]["url"].is_string(), "{body}");
    assert_eq!(body["output"]["prompt"], "a ünïcode portrait ✓");

    // 5. Progress in order, then the final body, nothing after.
    let posts = fake.seen_path("/job-done/w1/j1");
    let steps: Vec<u64> = posts
        .iter()
        .filter_map(|p| p.json()["output"]["step"].as_u64())
        .collect();
    assert!(!steps.is_empty(), "no progress posted");
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "progress out of order: {steps:?}"
    );
    assert!(
        posts.last().unwrap().json().get("status").is_none(),
        "a progress update came after the final result"
    );

    // 8. No take while j1 ran; j2 taken only after j1's final post.
    // j1 was handed out by the last take before its first progress post; every take after
    // that one must come after j1's final post.
    let j1_take = takes
        .iter()
        .rposition(|t| t.at < posts[0].at)
        .expect("j1 was taken");
    assert!(
        takes[j1_take + 1..].iter().all(|t| t.at >= done.at),
        "a take happened while j1 ran"
    );

    // 7. Heartbeats: one at start without job_id; some with job_id=j1 while it ran.
    let pings = fake.seen_path("/ping/w1");
    assert!(!pings[0].query.contains("job_id"), "{}", pings[0].query);
    assert!(
        pings
            .iter()
            .any(|p| p.query.starts_with("gpu=T&job_id=j1&runpod_version=")),
        "{:?}",
        pings.iter().map(|p| &p.query).collect::<Vec<_>>()
    );
    assert_eq!(pings[0].header("authorization").as_deref(), Some("k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_like_the_sdk_and_done_posts_are_retried_on_5xx_only() {
    let mut o = opts();
    o.max_output_bytes = 4096;
    let h = start(o).await;
    // 4. A validation failure: {"error": "<JSON text>"} with the six report keys.
    h.fake.push_take(TakeAnswer::Job(
        json!({ "id": "bad", "input": { "prompt": "x", "user_id": "../etc" } }),
    ));
    // 9. 500, 500, 200 → three posts.
    h.fake.push_done_status("retried", 500);
    h.fake.push_done_status("retried", 500);
    h.fake
        .push_take(TakeAnswer::Job(job("retried", "a portrait", 64, 2)));
    // 9. 400 → one post, the worker carries on.
    h.fake.push_done_status("refused", 400);
    h.fake
        .push_take(TakeAnswer::Job(job("refused", "a portrait", 64, 2)));
    h.fake
        .push_take(TakeAnswer::Job(job("after", "a portrait", 64, 2)));
    h.fake.wait_for_results(&["after"]).await;
    let (fake, _) = h.finish().await;

    let bad = fake.finals("bad")[0].json();
    assert!(bad.get("output").is_none());
    let report: Value = serde_json::from_str(bad["error"].as_str().unwrap()).unwrap();
    for key in [
        "error_type",
        "error_message",
        "error_traceback",
        "hostname",
        "worker_id",
        "runpod_version",
    ] {
        assert!(report.get(key).is_some(), "{key} missing: {report}");
    }
    assert_eq!(report["worker_id"], "w1");
    assert_eq!(report["error_type"], "validation_error");
    assert_eq!(fake.finals("retried").len(), 3);
    assert_eq!(fake.finals("refused").len(), 1);
    assert!(fake.finals("retried")[2].json()["output"].is_object());

    // 13. With a 4 KiB limit a normal result fits; see the oversize test below for the cut.
    let after = fake.finals("after")[0].json();
    assert!(after["output"].is_object(), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_results_become_error_results() {
    let mut o = opts();
    o.max_output_bytes = 64;
    let h = start(o).await;
    h.fake
        .push_take(TakeAnswer::Job(job("big", "a portrait", 64, 2)));
    h.fake.wait_for_results(&["big"]).await;
    let (fake, _) = h.finish().await;
    let body = fake.finals("big")[0].json();
    assert!(body.get("output").is_none(), "{body}");
    let report: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
    assert!(
        report["error_message"].as_str().unwrap().contains("limit"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stopped_by_the_platform_gets_no_result_and_the_worker_takes_the_next() {
    let h = start(opts()).await;
    h.fake
        .push_take(TakeAnswer::Job(job("A", "a long portrait", 256, 50)));
    h.fake.push_take(TakeAnswer::Job(job("B", "next", 64, 2)));
    h.fake
        .wait_for("A's first progress", |f| {
            !f.seen_path("/job-done/w1/A").is_empty()
        })
        .await;
    h.fake.stop_job("A");
    h.fake.wait_for_results(&["B"]).await;
    let rec = h.service.jobs().get("A").unwrap().unwrap();
    let (fake, _) = h.finish().await;
    assert!(
        fake.finals("A").is_empty(),
        "a stopped job must get no job-done"
    );
    assert_eq!(rec.status.as_str(), "CANCELLED");
    let stops = fake.seen_path("/job-stop/w1");
    assert!(!stops.is_empty());
    assert_eq!(stops[0].query, "gpu=T");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_stop_poll_delays_neither_progress_nor_the_result_nor_the_next_take() {
    // The platform holds the stop channel's long poll (the worker waits up to poll_timeout);
    // here far longer than the jobs take.
    let hold = Duration::from_secs(20);
    let h = start(WorkerOptions {
        poll_timeout: Duration::from_secs(60),
        ..opts()
    })
    .await;
    h.fake.hold_stop_polls(hold);
    h.fake
        .push_take(TakeAnswer::Job(job("held-1", "a portrait", 64, 4)));
    h.fake
        .push_take(TakeAnswer::Job(job("held-2", "another", 64, 2)));
    h.fake.wait_for_results(&["held-1", "held-2"]).await;
    let (fake, _) = h.finish().await;
    let progress = fake
        .seen_path("/job-done/w1/held-1")
        .into_iter()
        .filter(|s| s.json().get("status").is_some())
        .count();
    assert!(progress > 0, "no progress was posted");
    // Everything was posted while the first stop poll was still held.
    let polls = fake.seen_path("/job-stop/w1");
    assert!(!polls.is_empty(), "the stop channel was never polled");
    for s in fake.seen_path("/job-done/") {
        assert!(
            s.at < polls[0].at + hold,
            "{} {} waited for the stop poll",
            s.path,
            s.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_ids_are_escaped_in_the_result_url() {
    let h = start(opts()).await;
    h.fake.push_take(TakeAnswer::Job(
        json!({ "id": "q?isStream=true&a=/../x", "input": { "prompt": "p", "user_id": "u1", "width": 64, "height": 64 } }),
    ));
    h.fake
        .wait_for("the result", |f| !f.seen_path("/job-done/w1/q").is_empty())
        .await;
    let (fake, _) = h.finish().await;
    let posts = fake.seen_path("/job-done/w1/q");
    assert_eq!(
        posts.len(),
        1,
        "{:?}",
        posts.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    assert_eq!(
        posts[0].path,
        "/v2/ep/job-done/w1/q%3FisStream%3Dtrue%26a%3D%2F..%2Fx"
    );
    assert_eq!(posts[0].query, "gpu=T&isStream=false");
    // The id is not one the worker accepts: the platform hears why.
    assert!(
        posts[0].body.contains("invalid job id"),
        "{}",
        posts[0].body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_stop_channel_is_polled_after_the_back_off() {
    let h = start(opts()).await;
    h.fake.answer_stop_polls_with(429);
    h.fake
        .push_take(TakeAnswer::Job(job("slow", "a long portrait", 256, 30)));
    // Stop polls run only while the job runs: two of them, so the gap below is measured
    // (a job that ended first would leave nothing to compare, and the wait fails).
    // Stop polls run only while the job runs (~3 s here): two of them at least, so a gap is
    // measured below (a job that ended first would leave nothing to compare; the wait fails).
    h.fake
        .wait_for("a poll after the back-off", |f| {
            f.seen_path("/job-stop/w1").len() >= 2
        })
        .await;
    h.fake.wait_for_results(&["slow"]).await;
    let (fake, _) = h.finish().await;
    let polls = fake.seen_path("/job-stop/w1");
    assert!(!polls.is_empty(), "the stop channel was never polled");
    // opts(): polls 100 ms apart, 400 ms after a 429.
    for w in polls.windows(2) {
        let gap = w[1].at.duration_since(w[0].at);
        assert!(
            gap >= Duration::from_millis(400),
            "polled again after {gap:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_that_cannot_be_a_path_segment_gets_no_post_elsewhere() {
    let h = start(opts()).await;
    h.fake.push_take(TakeAnswer::Job(
        json!({ "id": "..", "input": { "prompt": "p", "user_id": "u1", "width": 64, "height": 64 } }),
    ));
    h.fake
        .push_take(TakeAnswer::Job(job("after-dots", "p", 64, 2)));
    h.fake.wait_for_results(&["after-dots"]).await;
    let (fake, _) = h.finish().await;
    for s in fake.seen_path("/job-done/") {
        assert_eq!(
            s.path, "/v2/ep/job-done/w1/after-dots",
            "a post went elsewhere"
        );
    }
}

#[test]
fn webhook_variables_are_checked_before_the_first_take() {
    let env = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RunpodEnv::from_vars(move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
            .unwrap()
    };
    let take = (
        "RUNPOD_WEBHOOK_GET_JOB",
        "http://h/v2/ep/job-take/$ID?gpu=T",
    );
    let done = (
        "RUNPOD_WEBHOOK_POST_OUTPUT",
        "http://h/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=T",
    );
    assert_eq!(env(&[take, done]).check(), Ok(()));
    let e = env(&[take]).check().unwrap_err();
    assert!(e.contains("RUNPOD_WEBHOOK_POST_OUTPUT is unset"), "{e}");
    let e = env(&[("RUNPOD_WEBHOOK_GET_JOB", "not a url"), done])
        .check()
        .unwrap_err();
    assert!(e.contains("RUNPOD_WEBHOOK_GET_JOB is not a URL"), "{e}");
    let e = env(&[
        take,
        done,
        ("RUNPOD_WEBHOOK_PING", "ftp://h/ping"),
        ("RUNPOD_AI_API_KEY", "k"),
        ("RUNPOD_POD_ID", "w1"),
    ])
    .check()
    .unwrap_err();
    assert!(
        e.contains("RUNPOD_WEBHOOK_PING must be an http(s) URL"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_job_posts_its_result_and_takes_nothing_more() {
    let h = start(opts()).await;
    h.fake
        .push_take(TakeAnswer::Job(job("S", "a portrait", 256, 20)));
    h.fake
        .push_take(TakeAnswer::Job(job("never", "a portrait", 64, 2)));
    h.fake
        .wait_for("S running", |f| !f.seen_path("/job-done/w1/S").is_empty())
        .await;
    h.stop.send_replace(true);
    let signalled = std::time::Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(60), h.task)
        .await
        .unwrap()
        .unwrap();
    h.service.stop().await;
    assert_eq!(exit, WorkerExit::Shutdown);
    assert_eq!(h.fake.finals("S").len(), 1);
    assert!(
        h.fake
            .seen_path("/job-take/")
            .iter()
            .all(|t| t.at <= signalled),
        "took a job after the signal"
    );
    assert!(h.fake.finals("never").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_takes_back_off() {
    let h = start(opts()).await;
    h.fake.push_take(TakeAnswer::Status(429));
    h.fake
        .push_take(TakeAnswer::Job(job("late", "a portrait", 64, 2)));
    h.fake.wait_for_results(&["late"]).await;
    let (fake, _) = h.finish().await;
    let takes = fake.seen_path("/job-take/");
    // The worker may poll once (204) before the 429 is scripted: look for the pause anywhere.
    assert!(
        takes
            .windows(2)
            .any(|w| w[1].at.duration_since(w[0].at) >= Duration::from_millis(400)),
        "no back-off after 429"
    );
}

fn headshot(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_headshot"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .current_dir(dir)
        .env("HEADSHOT_LOG", "error")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .output()
        .unwrap()
}

#[test]
fn one_shot_mode_runs_test_input_with_the_sdk_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"input": {"prompt": "a portrait", "user_id": "u1", "width": 64, "height": 64}}"#;
    let out = headshot(dir.path(), &["worker", "--test-input", ok]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["output"]["images"][0]["url"].is_string());

    let bad = r#"{"input": {"prompt": "a portrait", "user_id": "../x"}}"#;
    let out = headshot(dir.path(), &["worker", "--test-input", bad]);
    assert_eq!(out.status.code(), Some(1));

    // Missing file → exit 1; then ./test_input.json is used.
    let out = headshot(dir.path(), &["worker"]);
    assert_eq!(out.status.code(), Some(1));
    // One that is there but unreadable is named with the reason, not called missing.
    std::fs::create_dir(dir.path().join("test_input.json")).unwrap();
    let out = headshot(dir.path(), &["worker"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reading ./test_input.json"), "{err}");
    std::fs::remove_dir(dir.path().join("test_input.json")).unwrap();
    std::fs::write(
        dir.path().join("test_input.json"),
        ok.replace("a portrait", "from the file"),
    )
    .unwrap();
    let out = headshot(dir.path(), &["worker"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = headshot(dir.path(), &["worker", "--test-input", r#"{"id": "x"}"#]);
    assert_eq!(out.status.code(), Some(1));

    // On Runpod (RUNPOD_ENDPOINT_ID set) log lines are {"requestId", "message", "level"}.
    let out = Command::new(env!("CARGO_BIN_EXE_headshot"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["worker", "--test-input", r#"{"id": "logged-job", "input": {"prompt": "a portrait", "user_id": "u1", "width": 64, "height": 64}}"#])
        .current_dir(dir.path())
        .env("HEADSHOT_LOG", "info")
        .env("RUNPOD_ENDPOINT_ID", "ep")
        .env_remove("RUNPOD_WEBHOOK_GET_JOB")
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // The default local store's URLs point at a local API this mode does not serve: said.
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .unwrap_or("")
                .contains("does not serve")),
        "{lines:?}"
    );
    let finished = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("job finished")
        })
        .expect("a job log line");
    assert_eq!(finished["requestId"], "logged-job");
    assert_eq!(finished["level"], "INFO");
    assert!(
        lines
            .iter()
            .all(|l| l.get("requestId").is_some() && l.get("level").is_some())
    );
}

async fn spawn_worker(fake: &FakeRunpod, dir: &std::path::Path) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_headshot"));
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("worker")
        .current_dir(dir)
        .env("HEADSHOT_LOG", "warn");
    for (k, v) in fake.vars() {
        cmd.env(k, v);
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    cmd.spawn().unwrap()
}

fn sigterm(child: &tokio::process::Child) {
    // The shell's built-in `kill`: CI images may lack procps' /bin/kill.
    let pid = child.id().unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {pid}"))
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_process_finishes_the_job_posts_it_and_exits_zero() {
    let fake = FakeRunpod::start().await;
    let dir = tempfile::tempdir().unwrap();
    fake.push_take(TakeAnswer::Job(job("T", "a portrait", 256, 20)));
    fake.push_take(TakeAnswer::Job(job("never", "a portrait", 64, 2)));
    let mut child = spawn_worker(&fake, dir.path()).await;
    fake.wait_for("T running", |f| !f.seen_path("/job-done/w1/T").is_empty())
        .await;
    sigterm(&child);
    let signalled = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(fake.finals("T").len(), 1, "the job in flight was posted");
    assert!(fake.finals("never").is_empty());
    assert!(
        fake.seen_path("/job-take/")
            .iter()
            .all(|t| t.at <= signalled + Duration::from_millis(50))
    );

    // Idle, inside a long-poll: exits at once.
    let mut child = spawn_worker(&fake, dir.path()).await;
    fake.wait_for("a take", |f| f.seen_path("/job-take/").len() >= 4)
        .await;
    sigterm(&child);
    let t = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecoverable_gpu_error_posts_stop_pod_and_the_worker_takes_nothing_more() {
    let h = start(opts()).await;
    h.service
        .inference()
        .inject_fault(headshot_host::jobs::inference::InjectedFault {
            after_step: 2,
            message:
                "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered (injected)"
                    .into(),
            ..Default::default()
        });
    h.fake
        .push_take(TakeAnswer::Job(job("gpu-dies", "a portrait", 64, 4)));
    h.fake
        .push_take(TakeAnswer::Job(job("never", "a portrait", 64, 2)));
    let exit = tokio::time::timeout(Duration::from_secs(60), h.task)
        .await
        .unwrap()
        .unwrap();
    h.service.stop().await;
    assert_eq!(exit, WorkerExit::StopPod);
    let body = h.fake.finals("gpu-dies")[0].json();
    assert_eq!(body["stopPod"], true, "{body}");
    let report: Value = serde_json::from_str(body["error"].as_str().unwrap()).unwrap();
    assert_eq!(report["error_type"], "generation_error");
    assert!(h.fake.finals("never").is_empty());
}
