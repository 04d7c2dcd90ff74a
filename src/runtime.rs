//! Process-wide settings that the `reneg` binary (and the benchmark) apply at start.

/// Keeps freed memory in the process for the next allocation, instead of handing every large
/// buffer back to the kernel when it is freed.
///
/// glibc serves allocations over its mmap threshold (at most 32 MB by default) with fresh
/// mappings and unmaps them on free, so each activation of an SD model at 256-512 px (tens to
/// hundreds of MB) is page-faulted and zeroed by the kernel again on every use: 10-15% of a
/// full32 gradient step on the 2-core machine went to page faults. Raising the threshold and
/// the trim threshold keeps that memory on the heap for reuse (measured in BENCHMARKS.md: the
/// gradient step about 15% faster, peak RSS about 2% higher). Returns whether the allocator
/// took the settings (always false off glibc, where nothing is changed).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // mallopt takes an int: the largest threshold it can express.
        let most = libc::c_int::MAX;
        // SAFETY: mallopt only changes allocator parameters; it is called before any thread
        // is started by reneg, and glibc serialises it against allocation anyway.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, most) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, most) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
