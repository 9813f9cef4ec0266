//! Peak resident memory of processes (Linux `VmHWM`), reported next to every benchmark's
//! throughput.
//!
//! Why peak and not current: a benchmark's memory question is how much a machine must have, which
//! is the high-water mark; Linux keeps it per process, so reading it costs one file read at the end.

/// Peak resident set size of this process in bytes, or 0 where unknown.
pub fn peak_rss() -> u64 {
    peak_of("/proc/self/status")
}

/// Peak resident set size of process `pid` in bytes; 0 once it is gone.
pub fn peak_rss_of(pid: u32) -> u64 {
    peak_of(&format!("/proc/{pid}/status"))
}

/// The `VmHWM` line of a `/proc/*/status` file, in bytes.
fn peak_of(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
