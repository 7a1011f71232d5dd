//! Giving freed heap memory back to the operating system.
//!
//! glibc's allocator keeps freed pages inside its arenas (one per thread that allocated) and
//! returns only the top of each heap on its own. A worker that generates image after image
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
