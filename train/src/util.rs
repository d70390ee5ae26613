//! Small helpers below every other module: this machine's name, and stderr lines that a
//! closed or full stderr cannot turn into a panic.
use std::fs;
use std::io::Write;

/// This machine's name, for lock owners and event file names.
pub(crate) fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Writes a line to stderr, ignoring a closed or full stderr (where `eprintln!` panics).
pub(crate) fn stderr_line(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}
