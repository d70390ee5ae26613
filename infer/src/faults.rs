//! A testing hook for the fault tests (`tests/faults.rs`, through `train`'s hidden
//! `--crash-at-write N`): the folder writers call `point()` at each step of a save
//! (before and in the middle of each file, before the manifest, around each rename),
//! and the Nth call kills the process with SIGKILL, as a power cut or the OOM killer
//! would, so that every step of a save can be interrupted deterministically. Off (0)
//! unless set.
use std::sync::atomic::{AtomicU64, Ordering};

static CRASH_AT: AtomicU64 = AtomicU64::new(0);
static POINTS: AtomicU64 = AtomicU64::new(0);

/// Kill the process at the `n`th write point from now (1-based; 0 turns the hook off).
pub fn crash_at(n: u64) {
    POINTS.store(0, Ordering::SeqCst);
    CRASH_AT.store(n, Ordering::SeqCst);
}

/// One step of writing a folder.
pub fn point() {
    let n = POINTS.fetch_add(1, Ordering::SeqCst) + 1;
    if CRASH_AT.load(Ordering::SeqCst) == n {
        // SAFETY: sends SIGKILL to this process; nothing runs after it.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}
