//! `heap::tune_allocator` keeps image-sized buffers out of glibc's arenas: freed, they go back
//! to the OS at once even with small allocations made between them still alive. (Its own
//! process: resident size is per process, and the fixed threshold is process-wide.)

fn rss_mib() -> Option<f64> {
    headshot_host::heap::proc_status_mib("VmRSS")
}

#[test]
fn freed_large_buffers_leave_no_resident_memory_behind() {
    let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
    assert_eq!(headshot_host::heap::tune_allocator(), glibc);
    let Some(start) = rss_mib() else {
        eprintln!("no /proc/self/status here: nothing to measure");
        return;
    };
    // Untuned, freeing this mapped buffer raises glibc's threshold past 4 MiB, and the
    // buffers below would come from the arena instead.
    drop(std::hint::black_box(vec![1u8; 4 << 20]));
    let mut big = Vec::new();
    let mut small = Vec::new();
    for i in 0..16u8 {
        big.push(std::hint::black_box(vec![i; 4 << 20]));
        small.push(std::hint::black_box(vec![i; 64]));
    }
    let peak = rss_mib().unwrap();
    drop(big);
    let after = rss_mib().unwrap();
    eprintln!("rss: start {start:.1} MiB, 16 x 4 MiB live {peak:.1} MiB, freed {after:.1} MiB");
    assert_eq!(small.len(), 16);
    if glibc {
        assert!(
            peak - start > 50.0,
            "the buffers should be resident: {start} -> {peak}"
        );
        assert!(
            peak - after > 50.0,
            "freeing the buffers returned only {:.1} MiB",
            peak - after
        );
    }
}
