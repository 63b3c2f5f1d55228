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

/// Keeps the kernel from backing this process's heap with transparent huge
/// pages. mimalloc asks for them on its arenas (`MADV_HUGEPAGE`), and a 2 MiB
/// page stays whole in RSS while any 4 KiB of it is in use, so the memory a
/// flood of connections touched would not go back when they close. The heap
/// of a proxy is small and its hot set smaller, so the TLB gain is not worth
/// that. Called first thing at start; pages faulted in before stay as they are.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag on
    // this process's memory map (inherited by children); no pointer is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
