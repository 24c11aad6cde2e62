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
//! rollup block per series), streamed series by series into the new data
//! file and switched by renaming the new index into place.
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

impl SeriesWrite {
    /// Bytes of the blobs it carries (what the data file receives).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.0.len()).sum::<usize>() + self.r1m.len() + self.r1h.len()
    }
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

    /// Start writing generation `gen + 1`; the caller pushes every series
    /// it keeps, then hands the result to [`PartWriter::finish_rewrite`].
    ///
    /// The new data file is written series by series, so compaction holds
    /// one series in memory, never the partition (a soak run's RSS jumped
    /// by the size of the day so far at each compaction of the open day).
    /// Until `finish_rewrite` renames the new index into place the current
    /// generation stays the one recovery opens; a crash before that leaves
    /// only a data file without an index, which `open` deletes.
    pub fn begin_rewrite(&self) -> std::io::Result<Rewrite> {
        let gen = self.gen + 1;
        let path = data_path(&self.dir, gen);
        let data = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        Ok(Rewrite {
            path,
            gen,
            data,
            len: 0,
            entries: Vec::new(),
            finished: false,
        })
    }

    /// Make `rw` the partition's generation: fsync its data, write its
    /// index beside the current one, fsync, rename it into place (the
    /// commit point), fsync the directory, then delete the old generation.
    /// Returns the new view.
    pub fn finish_rewrite(&mut self, mut rw: Rewrite, flush_id: u64) -> std::io::Result<PartView> {
        if rw.gen != self.gen + 1 {
            return Err(std::io::Error::other(format!(
                "partition rewrite to generation {} on top of {}",
                rw.gen, self.gen
            )));
        }
        let gen = rw.gen;
        rw.data.sync_data()?;
        let tmp = self.dir.join(format!("index-{gen}.tmp"));
        let mut framed = Vec::new();
        frame(&mut framed, &encode_record(flush_id, &rw.entries));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&framed)?;
            f.sync_data()?;
        }
        drop(framed);
        std::fs::rename(&tmp, index_path(&self.dir, gen))?;
        // From the rename on the new generation is what recovery opens:
        // its files must survive `Rewrite`'s drop, whatever fails next.
        rw.finished = true;
        sync_dir(&self.dir)?;
        // The switch is done; the old generation is garbage from here on.
        let _ = std::fs::remove_file(data_path(&self.dir, self.gen));
        let _ = std::fs::remove_file(index_path(&self.dir, self.gen));
        self.index = OpenOptions::new()
            .read(true)
            .append(true)
            .open(index_path(&self.dir, gen))?;
        self.data = OpenOptions::new().append(true).open(&rw.path)?;
        self.data_len = rw.len;
        self.gen = gen;
        let entries = std::mem::take(&mut rw.entries);
        let segments = entries.len();
        let mut index: HashMap<SeriesId, Vec<Segment>> = HashMap::with_capacity(segments);
        for (sid, seg) in entries {
            index.entry(sid).or_default().push(seg);
        }
        Ok(PartView {
            files: Arc::new(PartFiles {
                data: File::open(&rw.path)?,
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
    for s in series {
        let seg = place(&s, |bytes| {
            let b = BlockRef {
                off: base + blob.len() as u64,
                len: bytes.len() as u32,
            };
            blob.extend_from_slice(bytes);
            Ok(b)
        })
        .unwrap_or_else(|e: std::convert::Infallible| match e {});
        entries.push((s.id, seg));
    }
    (blob, entries)
}

/// The segment of `s`, each blob stored by `put` (chunks in order, then
/// the 1 min and 1 h rollups), which says where it went.
fn place<E>(
    s: &SeriesWrite,
    mut put: impl FnMut(&[u8]) -> Result<BlockRef, E>,
) -> Result<Segment, E> {
    let mut chunks = Vec::with_capacity(s.chunks.len());
    for (bytes, min_ts, max_ts, count) in &s.chunks {
        chunks.push(ChunkRef {
            block: put(bytes)?,
            min_ts: *min_ts,
            max_ts: *max_ts,
            count: *count,
        });
    }
    let r1m = put(&s.r1m)?;
    let r1h = put(&s.r1h)?;
    let min_ts = chunks.iter().map(|c| c.min_ts).min().unwrap_or(0);
    let max_ts = chunks.iter().map(|c| c.max_ts).max().unwrap_or(0);
    Ok(Segment {
        chunks,
        r1m,
        r1h,
        min_ts,
        max_ts,
    })
}

/// A partition generation being written by compaction (see
/// [`PartWriter::begin_rewrite`]). Only the small per-series index stays
/// in memory; blobs go straight to the file. Dropped unfinished (an error
/// half-way), it deletes its data file: the current generation was never
/// touched, so the store is as it was.
pub(crate) struct Rewrite {
    path: PathBuf,
    gen: u32,
    data: File,
    len: u64,
    entries: Vec<(SeriesId, Segment)>,
    finished: bool,
}

impl Rewrite {
    /// Append one series' blobs and note its segment. A series is pushed
    /// once; the data file is laid out in push order.
    pub fn push(&mut self, s: &SeriesWrite) -> std::io::Result<()> {
        let Rewrite { data, len, .. } = self;
        let seg = place(s, |bytes| -> std::io::Result<BlockRef> {
            let len32 = u32::try_from(bytes.len()).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "blob over 4 GiB")
            })?;
            data.write_all(bytes)?;
            let b = BlockRef {
                off: *len,
                len: len32,
            };
            *len += bytes.len() as u64;
            Ok(b)
        })?;
        self.entries.push((s.id, seg));
        Ok(())
    }
}

impl Drop for Rewrite {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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

    /// A rewrite is committed by the rename of its index and by nothing
    /// else: interrupted before it (a crash: the `Rewrite` never dropped),
    /// or abandoned after an error, the old generation is what opens.
    #[test]
    fn a_rewrite_commits_only_at_the_rename() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = |id, byte| SeriesWrite {
            id,
            chunks: vec![(vec![byte; 5], 0, 10, 3), (vec![byte + 1; 2], 11, 12, 2)],
            r1m: vec![byte + 2],
            r1h: vec![byte + 3],
        };
        let pdir = dir.path().join(dir_name(0));
        {
            let (mut pw, _) = PartWriter::open(dir.path(), 0, 1).expect("open");
            pw.append(1, vec![w(0, 10), w(1, 20)]).expect("append");
            // A crash half-way: the new data file exists, its index not.
            let mut rw = pw.begin_rewrite().expect("begin");
            rw.push(&w(0, 30)).expect("push");
            std::mem::forget(rw);
            std::fs::write(pdir.join("index-1.tmp"), b"torn").expect("tmp");
        }
        let (mut pw, view) = PartWriter::open(dir.path(), 0, 1).expect("reopen");
        assert_eq!((pw.gen, view.segments), (0, 2));
        assert!(!pdir.join("data-1.dat").exists(), "leftover data deleted");
        assert!(!pdir.join("index-1.tmp").exists(), "leftover index deleted");
        // Abandoned after an error: its file goes with it.
        let mut rw = pw.begin_rewrite().expect("begin");
        rw.push(&w(1, 40)).expect("push");
        drop(rw);
        assert!(!pdir.join("data-1.dat").exists());
        // Finished: the new generation holds exactly what was pushed.
        let mut rw = pw.begin_rewrite().expect("begin");
        rw.push(&w(1, 50)).expect("push");
        let view = pw.finish_rewrite(rw, 1).expect("finish");
        let check = |view: &PartView| {
            assert_eq!(view.segments, 1);
            let segs = view.index.get(&1).expect("series 1");
            let c = segs[0].chunks[1];
            assert_eq!((c.min_ts, c.max_ts, c.count), (11, 12, 2));
            assert_eq!(view.files.read(c.block).expect("read"), vec![51; 2]);
            assert_eq!(view.files.read(segs[0].r1h).expect("read"), vec![53]);
            assert!(!view.index.contains_key(&0));
        };
        check(&view);
        assert!(!pdir.join("data-0.dat").exists(), "old generation deleted");
        // Flushes after the switch go to the new generation.
        pw.append(2, vec![w(2, 60)]).expect("append");
        drop(pw);
        let (pw, view) = PartWriter::open(dir.path(), 0, 2).expect("reopen");
        assert_eq!((pw.gen, view.segments), (1, 2));
        let seg = &view.index.get(&2).expect("series 2")[0];
        assert_eq!(
            view.files.read(seg.chunks[0].block).expect("read"),
            vec![60; 5]
        );
        let mut one = view.clone();
        one.index.remove(&2);
        one.segments -= 1;
        check(&one);
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
