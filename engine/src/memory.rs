//! Allocator settings that keep the resident memory close to what is in use.
//!
//! glibc's malloc raises its mmap threshold to the size of every large block freed (up to 32 MiB), so after the
//! first batches, batch-sized buffers (mail bytes, statements) come from the heap arenas instead of their own
//! mappings, and memory freed there mostly stays resident; each thread may also get an arena of its own (up to 8 per
//! core). A fixed threshold sends every block of 256 KiB or more to its own mapping, returned to the system on
//! free, so a 40 MB mail or a burst on 100 mailboxes leaves no lasting footprint; and two arenas bound the rest (one
//! arena measured no lower and slower).

/// Applies the settings once per process; later calls do nothing. Other allocators and platforms are left alone.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(apply);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() {
    /// Blocks at least this large get their own mapping (a fixed value also stops glibc from raising it).
    const MMAP_THRESHOLD: libc::c_int = 256 * 1024;
    const ARENAS: libc::c_int = 2;
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time, from any thread.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_ARENA_MAX, ARENAS) == 1
    };
    if !ok {
        tracing::debug!("glibc refused the malloc settings; keeping its defaults");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() {}

/// Returns the free memory malloc keeps (in every arena) to the system: for after a burst of mail, whose many
/// small blocks leave the heaps fragmented so that they cannot shrink by themselves.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the allocator's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the allocator holds: bytes in use by the program, and freed bytes it keeps (not returned to the system).
/// `None` where this cannot be read (not glibc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorFigures {
    pub in_use: u64,
    pub free_kept: u64,
}

/// The allocator's figures now (glibc `mallinfo2`); for the benchmarks.
pub fn allocator_figures() -> Option<AllocatorFigures> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some(AllocatorFigures {
            in_use: (info.uordblks + info.hblkhd) as u64,
            free_kept: info.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}
