//! Giving freed heap memory back to the operating system.
//!
//! glibc's allocator keeps freed pages inside its arenas (by default one per thread that
//! allocated; [`tune_allocator`] caps them at one) and returns only the top of each heap on
//! its own. A worker that generates image after image
//! frees large, differently sized buffers on several threads, so its resident size creeps up
//! while the bytes it really holds stay flat (the soak bench counts both:
//! docs/RELIABILITY.md). `malloc_trim` walks every arena and releases whole free pages.

/// Releases free heap pages to the OS where the allocator supports it (glibc on Linux); a
/// no-op elsewhere. Takes about a millisecond on a worker's heap: call it between jobs, not
/// in a request path.
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointers, only walks the allocator's own state under
        // its locks, and is safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Buffers at least this large get their own mapping, returned to the OS when freed.
pub const MMAP_THRESHOLD_BYTES: usize = 128 * 1024;

/// Heap arenas glibc may keep: one, shared by every thread.
const ARENAS: usize = 1;

/// Sets glibc's allocator up for a long-running worker; call once, first thing in `main`,
/// before any thread starts. A no-op off glibc. Returns whether the allocator took every
/// setting. Two settings, each measured in the soak bench (docs/RELIABILITY.md):
///
/// - The mmap threshold fixed at [`MMAP_THRESHOLD_BYTES`] (its default, which glibc
///   otherwise raises up to 32 MiB each time a mapped buffer is freed). With the threshold
///   raised, the image-sized buffers every job allocates and frees land in the arenas between
///   small allocations that live longer, and the arenas only grow: 2.5 MiB less resident at
///   job 1000 with it fixed.
/// - One arena (`ARENAS`). glibc gives threads their own arenas (up to 8 per core); a worker's
///   long-lived small allocations (job history, stream ring, database cache) are made on
///   whichever runtime or blocking thread ran that step, so each arena ends up with free
///   holes between them that no other thread's allocations fill. With one arena the soak's
///   free arena bytes stayed at ~2 MiB instead of climbing from 7.9 to 9.5 MiB, and resident
///   memory stayed flat from job 2000 to 5000 (52.3 → 52.3 MiB, against 54.6 → 55.2) with no
///   loss of throughput: the worker's hot allocations are few and small (per-thread caches
///   serve them), its big buffers are mapped.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// `M_MMAP_THRESHOLD` in glibc's malloc.h.
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        /// `M_ARENA_MAX` in glibc's malloc.h.
        const M_ARENA_MAX: std::ffi::c_int = -8;
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // SAFETY: mallopt takes two integers and only changes the allocator's own settings
        // under its lock.
        unsafe {
            let threshold = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as std::ffi::c_int);
            let arenas = mallopt(M_ARENA_MAX, ARENAS as std::ffi::c_int);
            threshold == 1 && arenas == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A memory figure of this process from Linux's `/proc/self/status`, in MiB: `"VmRSS"`
/// (resident now) or `"VmHWM"` (peak resident). `None` where there is no such file.
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
