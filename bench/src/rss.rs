//! Resident memory from `/proc`: this process's current and peak RSS (`VmRSS`, `VmHWM`), resetting the peak
//! (`/proc/self/clear_refs`), and the RSS of another process tree (Dovecot runs as separate processes).

use std::collections::HashMap;

/// A `kB` field of `/proc/<pid>/status` (`self` for this process), in bytes.
pub fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// This process's resident set now.
pub fn current() -> u64 {
    status_bytes("self", "VmRSS").unwrap_or(0)
}

/// This process's peak resident set since start or the last [`reset_peak`].
pub fn peak() -> u64 {
    status_bytes("self", "VmHWM").unwrap_or(0)
}

/// Resets the peak to the current RSS (`echo 5 > /proc/self/clear_refs`, Linux 4.0+). `false` if not possible.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The summed current RSS of `root` and all its descendants.
pub fn tree_rss(root: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = parent(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        total += status_bytes(&pid.to_string(), "VmRSS").unwrap_or(0);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    total
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Bytes as `12.3 MB` (MiB, as `VmRSS` counts).
pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`): other work on the machine skews every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(current() > 0);
        assert!(peak() >= current() / 2);
        assert!(tree_rss(std::process::id()) > 0);
    }
}
