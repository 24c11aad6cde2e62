//! The open-file limit: every MQTT connection is a file descriptor, and the
//! usual soft limit (1,024 on many distributions) would refuse clients long
//! before memory runs out. At start the process raises its soft limit to
//! the hard limit the administrator allows (`ulimit -Hn`, `LimitNOFILE=` in
//! a systemd unit) — what it may do without privileges.

/// Raise the soft `RLIMIT_NOFILE` to the hard limit. Returns the limits
/// before and after, or `None` when they could not be read or set.
pub fn raise() -> Option<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let before = now.current?;
    // No hard limit: the kernel's ceiling for one process still applies.
    let target = now.maximum.unwrap_or_else(nr_open);
    if target <= before {
        return Some((before, before));
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: now.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Some((before, target)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    }
}

/// `fs.nr_open`, the most descriptors one process may have.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1_048_576)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let (before, after) = super::raise().expect("limits");
        assert!(after >= before);
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current, Some(after));
        if let Some(hard) = now.maximum {
            assert_eq!(after, hard);
        }
    }
}
