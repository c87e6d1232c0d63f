//! The futex calls of the shared-memory van, in one place: a wait and a
//! wake on one word shared between processes (a ring's "data arrived" and
//! "space freed" words), the wake of a reader group's private bell, and
//! `futex_waitv` (Linux 5.16), on which a group's thread sleeps on its
//! bell and all its rings' words at once. The kernel reads the words a
//! wait names and never writes them; what the words mean, and the
//! protocols that make sleeping on them safe, are the callers'
//! (`ring/mod.rs`, `group.rs`).

use std::sync::atomic::AtomicU32;
use std::sync::OnceLock;
use std::time::Duration;

/// Sleeps while a shared word holds `expected`, at most `timeout` (or
/// until woken, or on any error: EAGAIN, EINTR, ...).
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a futex wait on a word of a live mapping; the kernel compares
    // and sleeps atomically, and returns on any error (EAGAIN, EINTR, ...).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every sleeper on a shared word.
pub(crate) fn wake(word: &AtomicU32) {
    // SAFETY: a futex wake on a word of a live mapping.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Wakes one sleeper on a word of this process only.
pub(crate) fn wake_private(word: &AtomicU32) {
    // SAFETY: a futex wake on a word this process owns.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

/// One word of a `futex_waitv` (the kernel's `struct futex_waitv`).
#[repr(C)]
pub(crate) struct Waitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

const FUTEX2_SIZE_U32: u32 = 0x02;
const FUTEX2_PRIVATE: u32 = 128;

impl Waitv {
    /// A word of this process only.
    pub(crate) fn private(word: &AtomicU32, val: u32) -> Waitv {
        Waitv {
            val: val as u64,
            uaddr: word.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32 | FUTEX2_PRIVATE,
            reserved: 0,
        }
    }

    /// A word of a shared mapping (woken by another process).
    pub(crate) fn shared(word: &AtomicU32, val: u32) -> Waitv {
        Waitv {
            val: val as u64,
            uaddr: word.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        }
    }
}

/// Sleeps until a word differs from its value or is woken, or `timeout`
/// passes; the kernel's error, if any (`EAGAIN` when a word already
/// differs, `ETIMEDOUT`, `ENOSYS` without `futex_waitv`).
pub(crate) fn wait_any(words: &[Waitv], timeout: Duration) -> Option<i32> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current time into `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let nanos = now.tv_nsec as u64 + timeout.subsec_nanos() as u64;
    let until = libc::timespec {
        tv_sec: now.tv_sec
            + timeout.as_secs() as libc::time_t
            + (nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `words` are live words (this process's, or of mappings the
    // caller holds) described as the kernel expects; the kernel only reads
    // them and `until`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            words.as_ptr(),
            words.len() as libc::c_uint,
            0 as libc::c_uint,
            &until as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    (r < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Whether this kernel has `futex_waitv` (a wait on a word that already
/// differs returns `EAGAIN` at once; an old kernel says `ENOSYS`, a
/// sandbox may say `EPERM`).
pub(crate) fn waitv_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let word = AtomicU32::new(0);
        wait_any(&[Waitv::private(&word, 1)], Duration::from_millis(1)) == Some(libc::EAGAIN)
    })
}
