//! Shared set-up of the whole-worker benchmarks.

use headshot_host::config::Config;

/// A two-thread runtime, like the 2-core machines the figures are quoted for.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Defaults with data under `dir`, free ports and a fixed admin token; validated like a
/// config file would be.
pub fn config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.server.port = 0;
    config.server.admin_port = 0;
    config.server.admin_token = "bench-admin-token-0123456789".into();
    config.validate().expect("bench config is valid");
    config
}

/// Tunes glibc's allocator as the `headshot` binary does first thing (call before any thread
/// starts), unless `HEADSHOT_BENCH_GLIBC_DEFAULTS=1` asks to measure glibc's own behaviour.
pub fn tune_allocator() {
    if std::env::var("HEADSHOT_BENCH_GLIBC_DEFAULTS").as_deref() == Ok("1") {
        println!("INFO allocator: glibc defaults (HEADSHOT_BENCH_GLIBC_DEFAULTS=1)");
    } else {
        println!(
            "INFO allocator tuned: {}",
            headshot_host::heap::tune_allocator()
        );
    }
}
