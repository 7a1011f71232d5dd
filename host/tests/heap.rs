//! `heap::release_free_pages` really returns freed pages (its own process: resident size is
//! per process, and other tests would blur it).

fn rss_mib() -> Option<f64> {
    headshot_host::heap::proc_status_mib("VmRSS")
}

#[test]
fn freed_fragmented_memory_goes_back_to_the_os() {
    let Some(start) = rss_mib() else {
        eprintln!("no /proc/self/status here: nothing to measure");
        return;
    };
    // A million small blocks, then keep one in 256: every page still has a neighbour in use
    // somewhere around it, so the allocator cannot give the freed ones back by itself.
    let blocks: Vec<Vec<u8>> = (0..1_000_000).map(|i| vec![(i % 251) as u8; 64]).collect();
    let kept: Vec<Vec<u8>> = blocks
        .into_iter()
        .enumerate()
        .filter_map(|(i, b)| (i % 256 == 0).then_some(b))
        .collect();
    let before = rss_mib().unwrap();
    headshot_host::heap::release_free_pages();
    let after = rss_mib().unwrap();
    eprintln!("rss: start {start:.1} MiB, fragmented {before:.1} MiB, trimmed {after:.1} MiB");
    assert_eq!(kept.len(), 3907);
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        assert!(
            before - start > 40.0,
            "the blocks should occupy memory: {start} -> {before}"
        );
        assert!(
            before - after > 30.0,
            "trim released only {:.1} MiB",
            before - after
        );
    }
}
