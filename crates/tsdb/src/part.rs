//! Partitions: one directory per time range (a day by default) holding
//! sealed chunks and rollup blocks.
//!
//! * `data-{gen}.dat`: chunk and rollup blobs, appended;
//! * `index-{gen}.dat`: framed records, one per flush, each listing per
//!   series the chunks (offset, length, time range, count) and the 1 min /
//!   1 h rollup blocks written by that flush (a *segment*).
//!
//! A flush is committed by the checkpoint file, not by the index record:
//! records whose flush id is above the checkpoint's are a crash's leftovers
//! (their points are still in the WAL) and are cut off on open. Compaction
//! rewrites a partition into generation `gen + 1` (one chunk run and one
//! rollup block per series), switched by renaming the new index into place.
//! Retention drops a whole directory.

use crate::codec::{frame, unframe, write_varint, Reader};
use crate::model::SeriesId;
use crate::wal::sync_dir;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAX_INDEX_RECORD: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockRef {
    pub off: u64,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRef {
    pub block: BlockRef,
    pub min_ts: i64,
    pub max_ts: i64,
    pub count: u32,
}

/// What one flush (or one compaction) wrote for one series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub chunks: Vec<ChunkRef>,
    pub r1m: BlockRef,
    pub r1h: BlockRef,
    pub min_ts: i64,
    pub max_ts: i64,
}

/// The read side of a partition's data file. Compaction replaces it; a
/// query holding the old `Arc` keeps reading the unlinked file.
#[derive(Debug)]
pub(crate) struct PartFiles {
    data: File,
}

impl PartFiles {
    pub fn read(&self, b: BlockRef) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; b.len as usize];
        self.data.read_exact_at(&mut buf, b.off)?;
        Ok(buf)
    }
}

/// A partition as queries see it.
#[derive(Debug, Clone)]
pub(crate) struct PartView {
    pub files: Arc<PartFiles>,
    pub index: HashMap<SeriesId, Vec<Segment>>,
    pub segments: usize,
}

/// A partition's append side, owned by the maintenance thread.
pub(crate) struct PartWriter {
    pub dir: PathBuf,
    pub gen: u32,
    data: File,
    index: File,
    pub data_len: u64,
}

/// What a flush writes for one series into one partition.
pub(crate) struct SeriesWrite {
    pub id: SeriesId,
    /// Chunk bytes with (min_ts, max_ts, count).
    pub chunks: Vec<(Vec<u8>, i64, i64, u32)>,
    pub r1m: Vec<u8>,
    pub r1h: Vec<u8>,
}

pub(crate) fn dir_name(id: i64) -> String {
    format!("p{id}")
}

pub(crate) fn parse_dir_name(name: &str) -> Option<i64> {
    name.strip_prefix('p')?.parse().ok()
}

fn data_path(dir: &Path, gen: u32) -> PathBuf {
    dir.join(format!("data-{gen}.dat"))
}

fn index_path(dir: &Path, gen: u32) -> PathBuf {
    dir.join(format!("index-{gen}.dat"))
}

fn encode_block(out: &mut Vec<u8>, b: BlockRef) {
    write_varint(out, b.off);
    write_varint(out, u64::from(b.len));
}

fn decode_block(r: &mut Reader<'_>) -> Option<BlockRef> {
    Some(BlockRef {
        off: r.varint()?,
        len: r.u32v()?,
    })
}

fn encode_record(flush_id: u64, entries: &[(SeriesId, Segment)]) -> Vec<u8> {
    let mut out = Vec::new();
    write_varint(&mut out, flush_id);
    write_varint(&mut out, entries.len() as u64);
    for (id, s) in entries {
        write_varint(&mut out, u64::from(*id));
        write_varint(&mut out, s.chunks.len() as u64);
        for c in &s.chunks {
            encode_block(&mut out, c.block);
            crate::codec::put_zz(&mut out, c.min_ts);
            crate::codec::put_zz(&mut out, c.max_ts);
            write_varint(&mut out, u64::from(c.count));
        }
        encode_block(&mut out, s.r1m);
        encode_block(&mut out, s.r1h);
    }
    out
}

fn decode_record(rec: &[u8]) -> Option<(u64, Vec<(SeriesId, Segment)>)> {
    let mut r = Reader::new(rec);
    let flush_id = r.varint()?;
    let n = r.usize_v()?;
    let mut out = Vec::with_capacity(n.min(rec.len()));
    for _ in 0..n {
        let id = r.u32v()?;
        let nc = r.usize_v()?;
        let mut chunks = Vec::with_capacity(nc.min(rec.len()));
        for _ in 0..nc {
            chunks.push(ChunkRef {
                block: decode_block(&mut r)?,
                min_ts: r.zz()?,
                max_ts: r.zz()?,
                count: r.u32v()?,
            });
        }
        let r1m = decode_block(&mut r)?;
        let r1h = decode_block(&mut r)?;
        let min_ts = chunks.iter().map(|c| c.min_ts).min().unwrap_or(0);
        let max_ts = chunks.iter().map(|c| c.max_ts).max().unwrap_or(0);
        out.push((
            id,
            Segment {
                chunks,
                r1m,
                r1h,
                min_ts,
                max_ts,
            },
        ));
    }
    r.is_empty().then_some((flush_id, out))
}

impl PartWriter {
    /// Open or create partition `id` under `root`, loading the committed
    /// segments (flush id ≤ `committed`) and cutting anything after them.
    pub fn open(root: &Path, id: i64, committed: u64) -> std::io::Result<(PartWriter, PartView)> {
        let dir = root.join(dir_name(id));
        std::fs::create_dir_all(&dir)?;
        // The newest generation with an index file is current; others are
        // leftovers of an interrupted or finished compaction.
        let mut gens = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let name = e?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(g) = name
                .strip_prefix("index-")
                .and_then(|s| s.strip_suffix(".dat"))
                .and_then(|s| s.parse::<u32>().ok())
            {
                gens.push(g);
            }
        }
        let gen = gens.iter().copied().max().unwrap_or(0);
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let keep = name == format!("data-{gen}.dat") || name == format!("index-{gen}.dat");
            if !keep {
                std::fs::remove_file(e.path())?;
            }
        }
        let mut index = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(index_path(&dir, gen))?;
        let mut buf = Vec::new();
        index.read_to_end(&mut buf)?;
        let (records, _) = unframe(&buf, MAX_INDEX_RECORD);
        let mut view_index: HashMap<SeriesId, Vec<Segment>> = HashMap::new();
        let mut segments = 0;
        let mut good = 0usize;
        for rec in records {
            let Some((flush_id, entries)) = decode_record(rec) else {
                break;
            };
            if flush_id > committed {
                break;
            }
            good += rec.len() + 8;
            for (sid, seg) in entries {
                segments += 1;
                view_index.entry(sid).or_default().push(seg);
            }
        }
        if good < buf.len() {
            tracing::info!(
                partition = id,
                "cutting uncommitted flushes off a partition index"
            );
            index.set_len(good as u64)?;
            index.sync_data()?;
        }
        let data = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(data_path(&dir, gen))?;
        let data_len = data.metadata()?.len();
        let read = File::open(data_path(&dir, gen))?;
        sync_dir(&dir)?;
        Ok((
            PartWriter {
                dir,
                gen,
                data,
                index,
                data_len,
            },
            PartView {
                files: Arc::new(PartFiles { data: read }),
                index: view_index,
                segments,
            },
        ))
    }

    /// Append one flush's series and fsync; returns the segments to install.
    pub fn append(
        &mut self,
        flush_id: u64,
        series: Vec<SeriesWrite>,
    ) -> std::io::Result<Vec<(SeriesId, Segment)>> {
        let (blob, entries) = layout(self.data_len, series);
        let start = self.data_len;
        if let Err(e) = self.data.write_all(&blob) {
            let _ = self.data.set_len(start);
            return Err(e);
        }
        self.data.sync_data()?;
        self.data_len += blob.len() as u64;
        let mut framed = Vec::new();
        frame(&mut framed, &encode_record(flush_id, &entries));
        let before = self.index.metadata()?.len();
        if let Err(e) = self.index.write_all(&framed) {
            let _ = self.index.set_len(before);
            return Err(e);
        }
        self.index.sync_data()?;
        Ok(entries)
    }

    /// Write generation `gen + 1` holding exactly `series`, switch to it and
    /// delete the old files. Returns the new view.
    pub fn rewrite(
        &mut self,
        flush_id: u64,
        series: Vec<SeriesWrite>,
    ) -> std::io::Result<PartView> {
        let gen = self.gen + 1;
        let (blob, entries) = layout(0, series);
        let dpath = data_path(&self.dir, gen);
        {
            let mut data = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&dpath)?;
            data.write_all(&blob)?;
            data.sync_data()?;
        }
        let data = OpenOptions::new().append(true).open(&dpath)?;
        let tmp = self.dir.join(format!("index-{gen}.tmp"));
        let mut framed = Vec::new();
        frame(&mut framed, &encode_record(flush_id, &entries));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&framed)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, index_path(&self.dir, gen))?;
        sync_dir(&self.dir)?;
        // The switch is done; the old generation is garbage from here on.
        let _ = std::fs::remove_file(data_path(&self.dir, self.gen));
        let _ = std::fs::remove_file(index_path(&self.dir, self.gen));
        self.index = OpenOptions::new()
            .read(true)
            .append(true)
            .open(index_path(&self.dir, gen))?;
        self.data = data;
        self.data_len = blob.len() as u64;
        self.gen = gen;
        let segments = entries.len();
        let mut index: HashMap<SeriesId, Vec<Segment>> = HashMap::new();
        for (sid, seg) in entries {
            index.entry(sid).or_default().push(seg);
        }
        Ok(PartView {
            files: Arc::new(PartFiles {
                data: File::open(&dpath)?,
            }),
            index,
            segments,
        })
    }

    pub fn index_len(&self) -> std::io::Result<u64> {
        Ok(self.index.metadata()?.len())
    }

    /// Undo a failed flush: cut both files back to the given lengths.
    pub fn rollback(&mut self, data_len: u64, index_len: u64) -> std::io::Result<()> {
        self.data.set_len(data_len)?;
        self.index.set_len(index_len)?;
        self.data.sync_data()?;
        self.index.sync_data()?;
        self.data_len = data_len;
        Ok(())
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        let idx = self.index.metadata().map(|m| m.len()).unwrap_or(0);
        self.data_len + idx
    }
}

/// Lay out the blobs of `series` starting at file offset `base`.
fn layout(base: u64, series: Vec<SeriesWrite>) -> (Vec<u8>, Vec<(SeriesId, Segment)>) {
    let mut blob = Vec::new();
    let mut entries = Vec::with_capacity(series.len());
    let put = |blob: &mut Vec<u8>, bytes: &[u8]| {
        let b = BlockRef {
            off: base + blob.len() as u64,
            len: bytes.len() as u32,
        };
        blob.extend_from_slice(bytes);
        b
    };
    for s in series {
        let mut chunks = Vec::with_capacity(s.chunks.len());
        for (bytes, min_ts, max_ts, count) in &s.chunks {
            chunks.push(ChunkRef {
                block: put(&mut blob, bytes),
                min_ts: *min_ts,
                max_ts: *max_ts,
                count: *count,
            });
        }
        let r1m = put(&mut blob, &s.r1m);
        let r1h = put(&mut blob, &s.r1h);
        let min_ts = chunks.iter().map(|c| c.min_ts).min().unwrap_or(0);
        let max_ts = chunks.iter().map(|c| c.max_ts).max().unwrap_or(0);
        entries.push((
            s.id,
            Segment {
                chunks,
                r1m,
                r1h,
                min_ts,
                max_ts,
            },
        ));
    }
    (blob, entries)
}

/// Partition ids found under `root`.
pub(crate) fn list(root: &Path) -> std::io::Result<Vec<i64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root)? {
        let name = e?.file_name();
        if let Some(id) = name.to_str().and_then(parse_dir_name) {
            out.push(id);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_records_round_trip() {
        let seg = Segment {
            chunks: vec![ChunkRef {
                block: BlockRef { off: 5, len: 9 },
                min_ts: -3,
                max_ts: 77,
                count: 4,
            }],
            r1m: BlockRef { off: 14, len: 2 },
            r1h: BlockRef { off: 16, len: 2 },
            min_ts: -3,
            max_ts: 77,
        };
        let rec = encode_record(9, &[(3, seg.clone())]);
        let (f, e) = decode_record(&rec).expect("decodes");
        assert_eq!(f, 9);
        assert_eq!(e, vec![(3, seg)]);
        assert!(decode_record(&rec[..rec.len() - 1]).is_none());
    }

    #[test]
    fn uncommitted_flushes_are_cut_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = |id| SeriesWrite {
            id,
            chunks: vec![(vec![1, 2, 3], 0, 10, 3)],
            r1m: vec![],
            r1h: vec![],
        };
        {
            let (mut pw, _) = PartWriter::open(dir.path(), 0, 0).expect("open");
            pw.append(1, vec![w(0)]).expect("append");
            pw.append(2, vec![w(1)]).expect("append");
        }
        let (_, view) = PartWriter::open(dir.path(), 0, 1).expect("reopen");
        assert_eq!(view.segments, 1);
        assert!(view.index.contains_key(&0));
        assert!(!view.index.contains_key(&1));
        // The cut is permanent: committing flush 2 later does not revive it.
        let (_, view) = PartWriter::open(dir.path(), 0, 2).expect("reopen");
        assert_eq!(view.segments, 1);
    }
}
