//! The write-ahead log: numbered segment files of framed records
//! (`len`, `crc32`, payload), appended by one writer thread and made
//! durable with one `fdatasync` per group of appends (group commit).
//!
//! Payloads:
//! * `1` series definition (see `series.rs`);
//! * `2` points: count, then per point the series id, the timestamp as a
//!   zigzag delta from the previous point of the record, and the value
//!   (8 bytes for numeric series, a length-prefixed string for text).
//!
//! A checkpoint names the first segment still needed; older segments are
//! deleted once their points are in partition files.

use crate::codec::{frame, put_blob, put_f64, put_zz, unframe, write_varint, Reader};
use crate::model::{Kind, SeriesId, Value};
use crate::series::{decode_def, SeriesIndex};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) const REC_DEF: u8 = 1;
pub(crate) const REC_POINTS: u8 = 2;
/// Largest record accepted on replay (a group is split well below this).
pub(crate) const MAX_RECORD: usize = 64 << 20;

pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.wal"))
}

/// The segments in `dir`, ascending.
pub(crate) fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The segment being appended to.
pub(crate) struct Wal {
    dir: PathBuf,
    pub seq: u64,
    file: File,
    /// Bytes known good in the current segment (a failed write is cut back
    /// to here, so a full disk never leaves a torn record behind).
    len: u64,
    /// Bytes written since the last checkpoint, for the flush policy.
    pub bytes_since_checkpoint: u64,
}

impl Wal {
    pub fn create(dir: &Path, seq: u64) -> std::io::Result<Wal> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(segment_path(dir, seq))?;
        sync_dir(dir)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            seq,
            file,
            len: 0,
            bytes_since_checkpoint: 0,
        })
    }

    /// Append a group of framed records; on failure the segment is cut
    /// back to its previous length.
    pub fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Err(e) = self.file.write_all(buf) {
            // Best effort: if even the truncate fails, replay stops at the
            // torn record's bad checksum anyway.
            let _ = self.file.set_len(self.len);
            let _ = std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(self.len));
            return Err(e);
        }
        self.len += buf.len() as u64;
        self.bytes_since_checkpoint += buf.len() as u64;
        Ok(())
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Close this segment (synced) and start the next one.
    pub fn rotate(&mut self) -> std::io::Result<u64> {
        self.file.sync_data()?;
        let next = Wal::create(&self.dir, self.seq + 1)?;
        *self = Wal {
            bytes_since_checkpoint: 0,
            ..next
        };
        Ok(self.seq)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Encode one points record for `points` (kinds already checked).
pub(crate) fn encode_points(
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    points: &[(SeriesId, i64, Value)],
) {
    scratch.clear();
    scratch.push(REC_POINTS);
    write_varint(scratch, points.len() as u64);
    let mut prev = 0i64;
    for (id, ts, v) in points {
        write_varint(scratch, u64::from(*id));
        put_zz(scratch, ts.wrapping_sub(prev));
        prev = *ts;
        match v {
            Value::F64(x) => put_f64(scratch, *x),
            Value::Bool(b) => put_f64(scratch, if *b { 1.0 } else { 0.0 }),
            Value::Str(s) => put_blob(scratch, s.as_bytes()),
        }
    }
    frame(out, scratch);
}

/// What replaying one segment yields.
pub(crate) enum Replayed {
    Points(Vec<(SeriesId, i64, Value)>),
}

/// Read a segment: definitions go straight into `index`, point records are
/// handed to `apply`. Returns `Ok(true)` when the segment ended in a torn
/// or corrupt record (its tail is cut off so later appends are clean).
pub(crate) fn replay(
    path: &Path,
    index: &mut SeriesIndex,
    mut apply: impl FnMut(Replayed),
) -> std::io::Result<bool> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    let (records, valid) = unframe(&buf, MAX_RECORD);
    for rec in records {
        let mut r = Reader::new(rec);
        match r.u8() {
            Some(REC_DEF) => {
                let (id, key, kind) = decode_def(&mut r).ok_or_else(|| bad(path, "definition"))?;
                index
                    .insert(id, key, kind)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            }
            Some(REC_POINTS) => {
                let n = r.usize_v().ok_or_else(|| bad(path, "points"))?;
                let mut pts = Vec::with_capacity(n.min(rec.len()));
                let mut prev = 0i64;
                for _ in 0..n {
                    let id = r.u32v().ok_or_else(|| bad(path, "points"))?;
                    let ts = prev.wrapping_add(r.zz().ok_or_else(|| bad(path, "points"))?);
                    prev = ts;
                    let kind = index
                        .meta(id)
                        .map(|m| m.kind)
                        .ok_or_else(|| bad(path, "unknown series"))?;
                    let v = match kind {
                        Kind::Text => {
                            Value::Str(Arc::from(r.str().ok_or_else(|| bad(path, "text"))?))
                        }
                        Kind::Float | Kind::Bool => {
                            Value::F64(r.f64().ok_or_else(|| bad(path, "value"))?)
                        }
                    };
                    pts.push((id, ts, v));
                }
                apply(Replayed::Points(pts));
            }
            _ => return Err(bad(path, "record type")),
        }
    }
    let torn = valid < buf.len();
    if torn {
        tracing::warn!(path = %path.display(), valid, len = buf.len(), "cutting a torn tail off a WAL segment");
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(valid as u64)?;
    }
    Ok(torn)
}

fn bad(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: corrupt WAL record ({what})", path.display()),
    )
}
