//! Hints that ask the CPU to bring cache lines in ahead of their use.
//!
//! Why: where moving a cache line between cores is slow (the Intel VMs of
//! BENCHMARKS.md), the lines an op's block passes between the pushing
//! thread and the workers stalled each thread at their first use. Asked
//! for early, they travel while the thread does other work. A hint never
//! faults and changes nothing the program sees, whatever the address.
//! (Under Miri, which runs no `asm!`, they are left out.)

/// A cache line's bytes.
const LINE: usize = 64;

/// Asks for the cache lines that hold the `len` bytes from `p` (the first
/// `max_lines` of them) for writing, without waiting.
#[inline]
pub(crate) fn bytes_for_write(p: *const u8, len: usize, max_lines: usize) {
    let skip = p as usize % LINE;
    let lines = (skip + len).div_ceil(LINE).min(max_lines);
    for_write(p.wrapping_sub(skip), lines);
}

/// Asks for `lines` cache lines from `p` for reading, without waiting.
#[inline]
pub(crate) fn for_read(p: *const u8, lines: usize) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = p as *const i8;
        for i in 0..lines {
            // SAFETY: as in `for_write`.
            #[allow(unused_unsafe)]
            unsafe {
                _mm_prefetch(p.wrapping_add(LINE * i), _MM_HINT_T0)
            };
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = (p, lines);
}

/// Asks for `lines` cache lines from `p` for writing (PREFETCHW where the
/// CPU has it, else an ordinary prefetch), without waiting.
#[inline]
fn for_write(p: *const u8, lines: usize) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        if !has_prefetchw() {
            return for_read(p, lines);
        }
        for i in 0..lines {
            // Subtle: `_mm_prefetch` with `_MM_HINT_ET0` compiles to a
            // read prefetch unless the build enables `prfchw`, which the
            // default x86-64 target does not: the instruction is written
            // out, run only where CPUID has it.
            // SAFETY: a prefetch is a hint: it never faults and reads
            // nothing the program sees, whatever the address; the CPU has
            // the instruction (checked above).
            unsafe {
                std::arch::asm!(
                    "prefetchw [{0}]",
                    in(reg) p.wrapping_add(LINE * i),
                    options(nostack, preserves_flags, readonly)
                )
            };
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    let _ = (p, lines);
}

/// Whether the CPU has PREFETCHW (CPUID leaf 0x8000_0001, ECX bit 8;
/// Linux's `3dnowprefetch`), asked once. (Where it lacks it the
/// instruction may do nothing or fault: it is never used then.)
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
fn has_prefetchw() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: not asked yet; 1: no; 2: yes.
    static HAS: AtomicU8 = AtomicU8::new(0);
    match HAS.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x8000_0000
            // says whether the extended leaf asked next exists.
            #[allow(unused_unsafe)]
            let yes = unsafe {
                use std::arch::x86_64::__cpuid;
                __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
            };
            HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        v => v == 2,
    }
}
