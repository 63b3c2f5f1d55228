//! Returning the allocator's free memory to the OS.

/// Frees what mimalloc holds but no longer uses: its thread-local free pages
/// and the purgeable parts of its arenas go back to the OS (`madvise`) instead
/// of waiting for the delayed purge, which runs only when the thread that freed
/// them allocates again. Called once start-up's one-off allocations are gone.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes a plain bool, touches only mimalloc's own
    // bookkeeping, and is safe to call from any thread at any time (also when
    // mimalloc is not the global allocator: it then has nothing to collect).
    unsafe { libmimalloc_sys::mi_collect(true) }
}
