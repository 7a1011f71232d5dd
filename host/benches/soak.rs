//! Soak: `HEADSHOT_SOAK_JOBS=10000 cargo bench -p headshot-host --bench soak`.
//!
//! Runs demo jobs back to back through `/runsync` (real HTTP, sled, wasm policies, local
//! storage) and reports resident memory after warm-up and at the end; the target is under 5%
//! growth. `HEADSHOT_SOAK_RETENTION=N` bounds the job history to N jobs,
//! `HEADSHOT_SOAK_STREAMS=N` the finished jobs whose progress stream stays in memory
//! (`jobs.stream_keep_finished`), `HEADSHOT_SOAK_WARMUP=N` sets the warm-up (default a tenth
//! of the run, at least 50 jobs).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

/// Counts the bytes the process holds on the heap, so growth in resident memory can be told
/// apart: live bytes rising is a leak or an unbounded structure; live bytes flat while the
/// resident size rises is the allocator keeping freed pages (fragmentation).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Adds `size` to the live count when the allocation `p` succeeded.
fn counted(p: *mut u8, size: usize) -> *mut u8 {
    if !p.is_null() {
        LIVE.fetch_add(size, Ordering::Relaxed);
    }
    p
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        counted(p, layout.size())
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        counted(p, layout.size())
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        // On failure the old block stays allocated: count only a realloc that happened.
        if !moved.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_mib() -> f64 {
    LIVE.load(Ordering::Relaxed) as f64 / 1048576.0
}

use headshot_host::ingress::server::start;
use serde_json::{Value, json};

fn main() {
    let jobs: usize = std::env::var("HEADSHOT_SOAK_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let warmup = env("HEADSHOT_SOAK_WARMUP").unwrap_or((jobs / 10).max(50));
    // As the `headshot` binary does first thing; HEADSHOT_SOAK_GLIBC_DEFAULTS=1 skips it to
    // measure glibc's own behaviour.
    if env("HEADSHOT_SOAK_GLIBC_DEFAULTS") != Some(1) {
        println!(
            "INFO allocator tuned: {}",
            headshot_host::heap::tune_allocator()
        );
    }
    let rt = common::runtime();
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = common::config(dir.path());
        // HEADSHOT_SOAK_RETENTION bounds the job history (jobs.retention_count); unset, the
        // history holds every job of the run.
        if let Some(n) = env("HEADSHOT_SOAK_RETENTION") {
            config.jobs.retention_count = n;
        }
        if let Some(n) = env("HEADSHOT_SOAK_STREAMS") {
            config.jobs.stream_keep_finished = n;
        }
        println!(
            "INFO job history retention: {} jobs; finished streams kept: {}; warm-up {warmup} jobs",
            config.jobs.retention_count, config.jobs.stream_keep_finished
        );
        let running = start(config).await.expect("server");
        let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        let url = format!("http://{}/v2/local/runsync", running.api_addr);
        let rss = || running.service.monitor().read().process_rss_bytes as f64 / 1048576.0;
        let t = Instant::now();
        let mut after_warmup = 0.0;
        let mut live_after_warmup = 0.0;
        let mut failed = 0;
        for i in 0..jobs {
            if i == warmup {
                after_warmup = rss();
                live_after_warmup = live_mib();
                println!(
                    "INFO after {warmup} warm-up jobs: rss {after_warmup:.1} MiB, live heap {live_after_warmup:.1} MiB"
                );
            }
            let body = json!({ "input": { "prompt": format!("soak portrait {i}"), "user_id": "soak", "width": 64, "height": 64 } });
            let v: Value = c.post(&url).json(&body).send().await.expect("send").json().await.expect("json");
            if v["status"] != "COMPLETED" {
                failed += 1;
            }
            if i % 1000 == 999 {
                println!(
                    "INFO {} jobs, rss {:.1} MiB, live heap {:.1} MiB, {:.0} s",
                    i + 1,
                    rss(),
                    live_mib(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        let end = rss();
        let live_end = live_mib();
        println!(
            "RESULT soak: {jobs} jobs ({failed} failed) in {:.0} s; rss {after_warmup:.1} MiB after warm-up -> {end:.1} MiB at the end ({:+.2}%); live heap {live_after_warmup:.1} -> {live_end:.1} MiB ({:+.2}%)",
            t.elapsed().as_secs_f64(),
            (end - after_warmup) / after_warmup * 100.0,
            (live_end - live_after_warmup) / live_after_warmup * 100.0
        );
        running.shutdown().await;
    });
}
