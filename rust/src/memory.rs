//! Advice to the operating system about large output buffers.
//!
//! A freshly allocated multi-megabyte tensor is untouched memory: the first
//! write to every 4 KiB page faults into the kernel, and for a dequantized
//! weight those faults cost more than the dequantization itself. Asking for
//! transparent huge pages on the buffer (Linux `madvise(MADV_HUGEPAGE)`, which
//! takes effect where the system's THP mode is `madvise` or `always`) turns 512
//! faults into one. The advice changes no data and is harmless on memory that
//! is already populated.

/// Outputs smaller than this are not worth a system call.
pub const HUGEPAGE_ADVICE_MIN_BYTES: usize = 4 << 20;

#[cfg(target_os = "linux")]
const HUGEPAGE: usize = 2 << 20;

/// Advise huge pages for the 2 MiB-aligned interior of `buf`; best effort.
pub fn advise_hugepages<T>(buf: &mut [T]) {
    let bytes = std::mem::size_of_val(buf);
    if bytes < HUGEPAGE_ADVICE_MIN_BYTES {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGEPAGE);
        let end = (start + bytes) / HUGEPAGE * HUGEPAGE;
        if end > first {
            // SAFETY: [first, end) lies inside `buf`, which we borrow mutably;
            // MADV_HUGEPAGE only sets a flag on the mapping and never changes
            // its contents. A failure (e.g. THP disabled) is ignored.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
}
