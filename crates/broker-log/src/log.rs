//! The log file: opening, replaying and repairing `broker.log`, and writing
//! compacted snapshots.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::record::{self, MAGIC, RECORD_HEADER_LEN};
use crate::state::LiveState;
use crate::StoreError;

pub(crate) const LOG_FILE: &str = "broker.log";
pub(crate) const TMP_FILE: &str = "broker.log.tmp";

/// Result of opening and replaying the log.
pub(crate) struct Replay {
    /// Positioned at the end of the valid data.
    pub(crate) file: File,
    pub(crate) len: u64,
    pub(crate) state: LiveState,
}

pub(crate) fn log_path(dir: &Path) -> PathBuf {
    dir.join(LOG_FILE)
}

/// fsync a directory so a create/rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("fsync directory {}", dir.display()), e))
}

/// Read until `buf` is full or EOF; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Open (or create) `dir/broker.log`, replay it and cut off any bad tail.
pub(crate) fn open_log(dir: &Path) -> Result<Replay, StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::io(format!("create store directory {}", dir.display()), e))?;
    let tmp = dir.join(TMP_FILE);
    match std::fs::remove_file(&tmp) {
        Ok(()) => tracing::warn!(path = %tmp.display(), "removed leftover compaction file"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io(format!("remove {}", tmp.display()), e)),
    }

    let path = log_path(dir);
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::io(ctx("open"), e))?;
    let file_len = file
        .metadata()
        .map_err(|e| StoreError::io(ctx("stat"), e))?
        .len();

    if file_len < MAGIC.len() as u64 {
        // New file, or a crash while writing the magic of a new file.
        let mut head = vec![0u8; file_len as usize];
        file.read_exact(&mut head)
            .map_err(|e| StoreError::io(ctx("read"), e))?;
        if head[..] != MAGIC[..head.len()] {
            return Err(StoreError::Corrupt {
                path,
                reason: "file too short and not a log header".into(),
            });
        }
        if file_len > 0 {
            tracing::warn!(path = %path.display(), "log header was torn; reinitialising empty log");
        }
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(MAGIC))
            .and_then(|()| file.sync_all())
            .map_err(|e| StoreError::io(ctx("initialise"), e))?;
        sync_dir(dir)?;
        tracing::info!(path = %path.display(), "created new store log");
        return Ok(Replay {
            file,
            len: MAGIC.len() as u64,
            state: LiveState::default(),
        });
    }

    let mut state = LiveState::default();
    let mut offset = MAGIC.len() as u64;
    let mut records = 0u64;
    let mut bad: Option<String> = None;
    {
        let mut reader = BufReader::with_capacity(1 << 20, &mut file);
        let mut magic = [0u8; 8];
        reader
            .read_exact(&mut magic)
            .map_err(|e| StoreError::io(ctx("read header of"), e))?;
        if &magic != MAGIC {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("bad magic {magic:02x?}"),
            });
        }
        let mut body = Vec::new();
        loop {
            let mut header = [0u8; RECORD_HEADER_LEN];
            let n =
                read_full(&mut reader, &mut header).map_err(|e| StoreError::io(ctx("read"), e))?;
            if n == 0 {
                break;
            }
            if n < RECORD_HEADER_LEN {
                bad = Some("record header cut short".into());
                break;
            }
            let (len, crc) = record::parse_header(&header);
            let end = offset + RECORD_HEADER_LEN as u64 + u64::from(len);
            if end > file_len {
                bad = Some(format!("record of {len} bytes runs past end of file"));
                break;
            }
            body.resize(len as usize, 0);
            let n =
                read_full(&mut reader, &mut body).map_err(|e| StoreError::io(ctx("read"), e))?;
            if n < body.len() {
                bad = Some("record body cut short".into());
                break;
            }
            if crc32fast::hash(&body) != crc {
                bad = Some("record CRC mismatch".into());
                break;
            }
            match record::decode_batch(&body) {
                Ok(entries) => {
                    for entry in entries {
                        state.apply_entry(entry);
                    }
                }
                Err(e) => {
                    bad = Some(format!("malformed record: {e}"));
                    break;
                }
            }
            offset = end;
            records += 1;
        }
    }

    if let Some(reason) = bad {
        tracing::warn!(
            path = %path.display(),
            offset,
            dropped_bytes = file_len - offset,
            %reason,
            "store log has a torn or corrupt tail (crash mid-write?); truncating it"
        );
        file.set_len(offset)
            .and_then(|()| file.sync_all())
            .map_err(|e| StoreError::io(ctx("truncate"), e))?;
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| StoreError::io(ctx("seek"), e))?;

    let orphans = state.drop_orphans();
    if orphans > 0 {
        tracing::debug!(
            orphans,
            "dropped queued messages of sessions without metadata"
        );
    }
    tracing::info!(
        path = %path.display(),
        records,
        bytes = offset,
        retained = state.retained.len(),
        sessions = state.sessions.len(),
        next_seq = state.next_seq,
        "store log replayed"
    );
    Ok(Replay {
        file,
        len: offset,
        state,
    })
}

/// Write the live state to `dir/broker.log.tmp`, fsync it, rename it over
/// `broker.log` and fsync the directory. Returns the new file (positioned at
/// its end) and its length.
pub(crate) fn write_compacted(dir: &Path, state: &LiveState) -> Result<(File, u64), StoreError> {
    let tmp = dir.join(TMP_FILE);
    let result = write_tmp(&tmp, state).and_then(|(file, len)| {
        std::fs::rename(&tmp, log_path(dir))
            .map_err(|e| StoreError::io(format!("rename {} over log", tmp.display()), e))?;
        Ok((file, len))
    });
    match result {
        Ok((file, len)) => {
            // The rename happened; a failing directory fsync only weakens
            // power-loss durability of the rename itself.
            if let Err(e) = sync_dir(dir) {
                tracing::warn!(error = %e, "fsync of store directory after compaction failed");
            }
            Ok((file, len))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_tmp(tmp: &Path, state: &LiveState) -> Result<(File, u64), StoreError> {
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(|e| StoreError::io(ctx("create"), e))?;
    file.write_all(MAGIC)
        .map_err(|e| StoreError::io(ctx("write"), e))?;
    let mut len = MAGIC.len() as u64;
    state
        .write_snapshot(1 << 20, |chunk| {
            len += chunk.len() as u64;
            file.write_all(chunk)
        })
        .map_err(|e| StoreError::io(ctx("write"), e))?;
    file.sync_all()
        .map_err(|e| StoreError::io(ctx("fsync"), e))?;
    Ok((file, len))
}
