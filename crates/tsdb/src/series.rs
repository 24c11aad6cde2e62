//! The series index: `(tenant, device, metric)` → dense [`SeriesId`] and
//! back, with the kind fixed by the first point.
//!
//! New series are announced to the WAL writer while the index's write lock
//! is held, so a series' definition always precedes, in the WAL, every
//! point that uses its id. At each checkpoint the definitions are also
//! appended to `series.log`, which outlives the WAL segments it replaces.

use crate::codec::{frame, put_blob, unframe, write_varint, Reader};
use crate::model::{Kind, SeriesId, SeriesKey};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

/// Longest record accepted when reading back (names are bounded far below).
const MAX_DEF: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct SeriesMeta {
    pub key: SeriesKey,
    pub kind: Kind,
}

type Metrics = HashMap<Arc<str>, SeriesId>;

#[derive(Default)]
pub(crate) struct SeriesIndex {
    by_key: HashMap<Arc<str>, HashMap<Arc<str>, Metrics>>,
    pub metas: Vec<SeriesMeta>,
}

impl SeriesIndex {
    pub fn get(&self, tenant: &str, device: &str, metric: &str) -> Option<SeriesId> {
        self.by_key.get(tenant)?.get(device)?.get(metric).copied()
    }

    pub fn device(&self, tenant: &str, device: &str) -> Option<&Metrics> {
        self.by_key.get(tenant)?.get(device)
    }

    pub fn devices(&self, tenant: &str) -> impl Iterator<Item = (&Arc<str>, &Metrics)> {
        self.by_key.get(tenant).into_iter().flat_map(|m| m.iter())
    }

    pub fn meta(&self, id: SeriesId) -> Option<&SeriesMeta> {
        self.metas.get(id as usize)
    }

    pub fn len(&self) -> usize {
        self.metas.len()
    }

    /// Add a series. `id` must be the next id (recovery replays in order;
    /// a gap or a repeat with another key means a corrupt file).
    pub fn insert(&mut self, id: SeriesId, key: SeriesKey, kind: Kind) -> Result<(), String> {
        if (id as usize) < self.metas.len() {
            let m = &self.metas[id as usize];
            return if m.key == key {
                Ok(())
            } else {
                Err(format!("series {id} defined twice with different keys"))
            };
        }
        if id as usize != self.metas.len() {
            return Err(format!(
                "series {id} defined before series {}",
                self.metas.len()
            ));
        }
        self.by_key
            .entry(key.tenant.clone())
            .or_default()
            .entry(key.device.clone())
            .or_default()
            .insert(key.metric.clone(), id);
        self.metas.push(SeriesMeta { key, kind });
        Ok(())
    }
}

pub(crate) fn encode_def(out: &mut Vec<u8>, id: SeriesId, meta: &SeriesMeta) {
    write_varint(out, u64::from(id));
    out.push(meta.kind.code());
    put_blob(out, meta.key.tenant.as_bytes());
    put_blob(out, meta.key.device.as_bytes());
    put_blob(out, meta.key.metric.as_bytes());
}

pub(crate) fn decode_def(r: &mut Reader<'_>) -> Option<(SeriesId, SeriesKey, Kind)> {
    let id = r.u32v()?;
    let kind = Kind::from_code(r.u8()?)?;
    let tenant = Arc::from(r.str()?);
    let device = Arc::from(r.str()?);
    let metric = Arc::from(r.str()?);
    Some((
        id,
        SeriesKey {
            tenant,
            device,
            metric,
        },
        kind,
    ))
}

/// `series.log`: framed definitions, appended at checkpoints.
pub(crate) struct SeriesLog {
    file: File,
    /// Definitions below this id are in the file.
    pub persisted: usize,
}

impl SeriesLog {
    /// Open (creating) the log, load its definitions into `index`, and cut
    /// a torn tail left by a crash mid-append.
    pub fn open(path: &Path, index: &mut SeriesIndex) -> std::io::Result<SeriesLog> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (records, valid) = unframe(&buf, MAX_DEF);
        for rec in records {
            let mut r = Reader::new(rec);
            let (id, key, kind) = decode_def(&mut r).ok_or_else(|| corrupt(path))?;
            index
                .insert(id, key, kind)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        }
        if valid < buf.len() {
            tracing::warn!(path = %path.display(), "cutting a torn tail off the series log");
            file.set_len(valid as u64)?;
        }
        Ok(SeriesLog {
            file,
            persisted: index.len(),
        })
    }

    /// Append the definitions not yet in the file and fsync.
    pub fn persist(&mut self, index: &SeriesIndex) -> std::io::Result<()> {
        if self.persisted >= index.len() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut rec = Vec::new();
        for (id, meta) in index.metas.iter().enumerate().skip(self.persisted) {
            rec.clear();
            encode_def(&mut rec, id as SeriesId, meta);
            frame(&mut buf, &rec);
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.persisted = index.len();
        Ok(())
    }
}

fn corrupt(path: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: corrupt series definition", path.display()),
    )
}
