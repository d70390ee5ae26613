//! The process's peak resident memory (Linux's `VmHWM` in /proc/self/status, the high
//! water mark of the resident set), for the progress line and the run's summary.

/// Peak resident set size in bytes, where the system reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `peak` as people read it: "1.23 GiB", "456 MiB".
pub fn format_bytes(peak: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = peak as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// " · peak RSS 1.23 GiB", or nothing where the system does not say.
pub fn peak_suffix() -> String {
    peak_rss_bytes().map_or(String::new(), |b| {
        format!(" · peak RSS {}", format_bytes(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_grows_with_a_touched_allocation() {
        let before = peak_rss_bytes().expect("Linux reports VmHWM");
        let v = vec![1u8; 64 << 20];
        let after = peak_rss_bytes().unwrap();
        assert!(after >= before.max(64 << 20), "{before} → {after}");
        assert_eq!(v.iter().map(|&x| x as u64).sum::<u64>(), 64 << 20);
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
        assert_eq!(format_bytes(456 << 20), "456 MiB");
    }
}

/// Keeps freed memory in the process (glibc): a training step allocates and frees the
/// same large activation and gradient buffers every time, and glibc's default serves
/// them with fresh `mmap`s whose pages fault in again on every step.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: mallopt only changes glibc's allocation policy for later calls.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
