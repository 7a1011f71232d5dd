//! Soak: `HEADSHOT_SOAK_JOBS=10000 cargo bench -p headshot-host --bench soak`.
//!
//! Runs demo jobs back to back through `/runsync` (real HTTP, sled, wasm policies, local
//! storage) and reports resident memory after warm-up and at the end; the target is under 5%
//! growth. `HEADSHOT_SOAK_RETENTION=N` bounds the job history to N jobs,
//! `HEADSHOT_SOAK_STREAMS=N` the finished jobs whose progress stream stays in memory
//! (`jobs.stream_keep_finished`), `HEADSHOT_SOAK_WARMUP=N` sets the warm-up (default a tenth
//! of the run, at least 50 jobs).

use std::time::{Duration, Instant};

mod common;
#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{class_bytes, class_counts};

/// `describe(before, after)` for each size class where it has something to say, named.
fn per_class(
    before: &[usize],
    after: &[usize],
    describe: impl Fn(usize, usize) -> Option<String>,
) -> String {
    let mut out = Vec::new();
    for (k, (&b, &a)) in before.iter().zip(after).enumerate() {
        if let Some(change) = describe(b, a) {
            let name = if k == 0 {
                "aligned".to_string()
            } else {
                format!("<{}", 1u64 << k)
            };
            out.push(format!("{name}: {change}"));
        }
    }
    out.join(", ")
}

/// The size classes whose live bytes moved by at least 64 KiB between two `class_bytes`.
fn byte_changes(before: &[usize], after: &[usize]) -> String {
    per_class(before, after, |b, a| {
        (a.abs_diff(b) >= 64 << 10)
            .then(|| format!("{:+.2} MiB", (a as f64 - b as f64) / 1048576.0))
    })
}

/// The size classes whose live allocation count changed between two `class_counts`.
fn class_changes(before: &[usize], after: &[usize]) -> String {
    per_class(before, after, |b, a| (a != b).then(|| format!("{b}->{a}")))
}

/// Live heap bytes: the sum over the size classes.
fn live_mib() -> f64 {
    class_bytes().iter().sum::<usize>() as f64 / 1048576.0
}

/// glibc's own view of its heap (all arenas), so bytes malloc'd outside Rust (C libraries,
/// glibc itself) and free bytes kept in the arenas show next to the Rust live count.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_heap() -> String {
    /// `struct mallinfo2` in glibc's malloc.h (2.33+): ten size_t fields.
    #[repr(C)]
    #[derive(Default)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    unsafe extern "C" {
        fn mallinfo2() -> MallInfo2;
    }
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
    let m = unsafe { mallinfo2() };
    let mib = |b: usize| b as f64 / 1048576.0;
    format!(
        "glibc: arenas {:.1} MiB (in use {:.1}, free {:.1} in {} chunks, fastbins {:.2}), mmapped {:.1} MiB in {}",
        mib(m.arena),
        mib(m.uordblks),
        mib(m.fordblks),
        m.ordblks,
        mib(m.fsmblks),
        mib(m.hblkhd),
        m.hblks
    )
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_heap() -> String {
    String::new()
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
    let report_every = env("HEADSHOT_SOAK_REPORT_EVERY").unwrap_or(1000).max(1);
    common::tune_allocator();
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
        // Resident size between jobs: after the last response the job's tail (history write,
        // stream bookkeeping, the allocator trim) may still run for a moment, and the
        // monitor's reading can be up to 200 ms old, so wait briefly and read /proc directly.
        // Every figure (warm-up, reports, end) is taken the same way.
        let settle = || tokio::time::sleep(Duration::from_millis(300));
        let rss = || {
            headshot_host::heap::proc_status_mib("VmRSS").unwrap_or_else(|| {
                running.service.monitor().read().process_rss_bytes as f64 / 1048576.0
            })
        };
        let t = Instant::now();
        let mut after_warmup = 0.0;
        let mut live_after_warmup = 0.0;
        let mut classes_after_warmup = class_counts();
        let mut bytes_after_warmup = class_bytes();
        let mut failed = 0;
        for i in 0..jobs {
            if i == warmup {
                settle().await;
                after_warmup = rss();
                live_after_warmup = live_mib();
                classes_after_warmup = class_counts();
                bytes_after_warmup = class_bytes();
                println!(
                    "INFO after {warmup} warm-up jobs: rss {after_warmup:.1} MiB, live heap {live_after_warmup:.1} MiB; {}",
                    glibc_heap()
                );
            }
            let body = json!({ "input": { "prompt": format!("soak portrait {i}"), "user_id": "soak", "width": 64, "height": 64 } });
            let v: Value = c.post(&url).json(&body).send().await.expect("send").json().await.expect("json");
            if v["status"] != "COMPLETED" {
                failed += 1;
            }
            if (i + 1) % report_every == 0 {
                settle().await;
                println!(
                    "INFO {} jobs, rss {:.1} MiB, live heap {:.1} MiB, {:.0} s; {}",
                    i + 1,
                    rss(),
                    live_mib(),
                    t.elapsed().as_secs_f64(),
                    glibc_heap()
                );
                if i >= warmup {
                    println!(
                        "INFO   live allocations by size class since warm-up: {}",
                        class_changes(&classes_after_warmup, &class_counts())
                    );
                    println!(
                        "INFO   live bytes by size class since warm-up: {}",
                        byte_changes(&bytes_after_warmup, &class_bytes())
                    );
                }
            }
        }
        settle().await;
        let end = rss();
        let live_end = live_mib();
        println!(
            "INFO live allocations by size class, after warm-up -> end: {}",
            class_changes(&classes_after_warmup, &class_counts())
        );
        println!(
            "RESULT soak: {jobs} jobs ({failed} failed) in {:.0} s; rss {after_warmup:.1} MiB after warm-up -> {end:.1} MiB at the end ({:+.2}%); live heap {live_after_warmup:.1} -> {live_end:.1} MiB ({:+.2}%)",
            t.elapsed().as_secs_f64(),
            (end - after_warmup) / after_warmup * 100.0,
            (live_end - live_after_warmup) / live_after_warmup * 100.0
        );
        // HEADSHOT_SOAK_EXIT_HOT=1 exits with everything still held, so a heap profiler
        // (heaptrack) lists every live allocation as a leak, with its call count.
        if env("HEADSHOT_SOAK_EXIT_HOT") == Some(1) {
            std::process::exit(0);
        }
        running.shutdown().await;
    });
}
