//! A software prefetch: asks the CPU to bring a cache line in before it is read.
//!
//! The one place where tally uses `unsafe`. The prefetch instruction is a hint: it
//! never faults, whatever the address, does not dereference the pointer in Rust's
//! sense and cannot change what any load returns. `core::arch` still declares it
//! `unsafe` because it is a target-feature intrinsic taking a raw pointer, and the safe
//! `core::hint::prefetch_read` is not stable yet; when it is, this module goes.

/// Hints that the cache line holding `pointer` will be read soon (into every level).
/// A no-op on targets other than x86_64.
#[inline(always)]
#[allow(unsafe_code)]
pub(crate) fn prefetch_read<T>(pointer: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` only hints; it cannot fault or read for the program, and
    // SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            pointer.cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = pointer;
}
