//! Process-wide settings that the `reneg` binary (and the benchmark) apply at start.

/// Keeps freed memory in the process for the next allocation, instead of handing every large
/// buffer back to the kernel when it is freed.
///
/// glibc serves allocations over its mmap threshold (at most 32 MB by default) with fresh
/// mappings and unmaps them on free, so each activation of an SD model at 256-512 px (tens to
/// hundreds of MB) is page-faulted and zeroed by the kernel again on every use: 10-15% of a
/// full32 gradient step on the 2-core machine went to page faults. Raising the threshold and
/// the trim threshold keeps that memory on the heap for reuse (measured in BENCHMARKS.md: the
/// gradient step about 15% faster, peak RSS about 2% higher). It also keeps glibc to one
/// arena: the work runs on pool threads ([`run_on_workers`]), and with an arena per thread each
/// kept the memory freed on it apart from the others (full16 peak RSS 4.23 -> 4.57 GB; with
/// one arena 4.23 GB again at the same speed). Returns whether the allocator took the
/// settings (always false off glibc, where nothing is changed).
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
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Fixes the thread count that candle asks for on every matmul, once, at start.
///
/// candle 0.11's `utils::get_num_threads` reads `RAYON_NUM_THREADS` and, when it is unset,
/// counts the physical cores by parsing `/proc/cpuinfo` again: on every CPU matmul and in our
/// own convolution. The tiny pipeline's training step makes about 4,000 such calls, and that
/// parsing was about 10% of its time (perf). Setting the variable to the count candle would
/// compute anyway keeps the thread count exactly as it was and turns the lookup into an
/// environment read. A user's own `RAYON_NUM_THREADS` is left alone. Returns the count.
///
/// Call it before any thread is started: it writes the process environment.
pub fn fix_thread_count() -> usize {
    let n = candle_core::utils::get_num_threads();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    n
}

/// Runs `f` on one thread of a rayon pool of candle's thread count (call [`fix_thread_count`]
/// first, at start: this function does not write the environment), so that the many
/// short parallel sections of a forward or backward pass (gemm, convolutions, our kernels) are
/// forked from inside the pool: the other worker steals its half, and nothing is handed from an
/// outside thread to a sleeping worker and back through a lock and two wake-ups, as rayon does
/// for calls from a thread outside it. On the 2-core machine that hand-off was about a quarter
/// of the tiny pipeline's training step and a tenth of a full-size sampling evaluation
/// (BENCHMARKS.md). The workers get a 64 MiB stack: autograd walks a model's graph
/// recursively, and `f` would otherwise run with rayon's 2 MiB instead of the main thread's
/// 8 MiB. If the pool cannot be built, `f` runs on the calling thread.
pub fn run_on_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Address space only: pages are committed as they are touched.
    const STACK: usize = 64 << 20;
    match rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .stack_size(STACK)
        .thread_name(|i| format!("reneg-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}
