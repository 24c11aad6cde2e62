//! Reading a process's resident set size from `/proc` (Linux only).

/// `VmRSS` of process `pid` in KiB, from `/proc/<pid>/status`; `None` if the
/// process does not exist or the platform has no procfs.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let s = "Name:\tmosquitto\nVmPeak:\t  9000 kB\nVmRSS:\t    5432 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(s), Some(5432));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn own_process() {
        if cfg!(target_os = "linux") {
            assert!(rss_kb(std::process::id()).unwrap_or(0) > 0);
        }
    }
}
