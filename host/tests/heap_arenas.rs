//! `heap::tune_allocator` caps glibc at one heap arena: threads started afterwards share it
//! instead of each getting an arena of its own (whose free holes no other thread fills; see
//! heap.rs). Counted from glibc's own report (`malloc_info`). Its own process: the cap is
//! process-wide and only affects threads that first allocate after it is set.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heaps() -> usize {
    use std::ffi::{CString, c_char, c_int, c_void};
    unsafe extern "C" {
        fn fopen(path: *const c_char, mode: *const c_char) -> *mut c_void;
        fn fclose(stream: *mut c_void) -> c_int;
        fn malloc_info(options: c_int, stream: *mut c_void) -> c_int;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("malloc_info.xml");
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: plain C stdio on a path we own; the stream is closed before the file is read.
    unsafe {
        let f = fopen(c_path.as_ptr(), c"w".as_ptr());
        assert!(!f.is_null(), "fopen {}", path.display());
        assert_eq!(malloc_info(0, f), 0, "malloc_info");
        fclose(f);
    }
    let xml = std::fs::read_to_string(&path).unwrap();
    xml.matches("<heap nr=").count()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn threads_started_after_tuning_share_one_arena() {
    assert!(headshot_host::heap::tune_allocator());
    let before = heaps();
    // Eight threads allocating at the same time: untuned, each gets an arena of its own.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let held: Vec<Vec<u8>> = (0..64).map(|j| vec![i as u8; 100 + j]).collect();
                barrier.wait();
                held.len()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 64);
    }
    let after = heaps();
    eprintln!("glibc heap arenas: {before} before the threads, {after} after");
    assert!(before >= 1);
    assert_eq!(
        after, before,
        "threads started after tuning got arenas of their own"
    );
}
