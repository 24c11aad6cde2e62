/// Errors of the time-series store. Cloneable: one write failure is
/// reported to every append of the group commit it hit.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TsdbError {
    #[error("the disk is full (less than {min_free} bytes free); new points are refused until space is freed")]
    DiskFull { min_free: u64 },
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("the time-series store is closed")]
    Closed,
    #[error("{0}")]
    Invalid(String),
    #[error("metric `{0}` holds text values; aggregates need numbers")]
    NotNumeric(String),
    #[error("corrupt time-series store: {0}")]
    Corrupt(String),
}

impl From<std::io::Error> for TsdbError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::InvalidData {
            TsdbError::Corrupt(e.to_string())
        } else {
            TsdbError::Io(e.to_string())
        }
    }
}

/// Is this the error a full disk gives (ENOSPC / EDQUOT)?
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    // ENOSPC and EDQUOT on Linux.
    matches!(e.raw_os_error(), Some(28) | Some(122))
}
