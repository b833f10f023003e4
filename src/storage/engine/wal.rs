//! Write-ahead log: every write is appended here before it reaches the memtable.
//!
//! One file per epoch, `wal/{epoch:020}.wal`. A checkpoint starts a new epoch and deletes
//! the files whose data reached segments. Each record is `len u32, crc32 u32, payload`
//! (little-endian). Appends go to the operating system at once, so a killed process loses
//! nothing; `fsync` runs once per commit interval (group commit). Replay stops at the first
//! torn or corrupt record, which can only be the tail of a file that was being written.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::model::ValueKind;
use crate::storage::{SeriesKey, StorageError};

const RECORD_SERIES: u8 = 1;
const RECORD_POINTS: u8 = 2;
const POINT_LEN: usize = 20;

/// A decoded WAL record.
#[derive(Debug)]
pub enum Record {
    /// A new series and the id every later record uses for it.
    Series {
        id: u32,
        kind: ValueKind,
        key: SeriesKey,
    },
    /// Points as (series id, timestamp in ms, value).
    Points(Vec<(u32, i64, f64)>),
}

pub fn wal_path(dir: &Path, epoch: u64) -> PathBuf {
    dir.join(format!("{epoch:020}.wal"))
}

/// Lists WAL files as (epoch, path), oldest first.
pub fn list_wal_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        files.push((epoch, entry.path()));
    }
    files.sort();
    Ok(files)
}

/// The file that receives appends for the current epoch.
#[derive(Debug)]
pub struct WalWriter {
    pub epoch: u64,
    pub file: File,
    /// Records appended since the store opened; the durable watermark counts the same way.
    pub appended_seq: u64,
    pub bytes_in_epoch: u64,
}

impl WalWriter {
    pub fn create(dir: &Path, epoch: u64, appended_seq: u64) -> Result<WalWriter, StorageError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(wal_path(dir, epoch))?;
        super::segment::sync_dir(dir)?;
        Ok(WalWriter {
            epoch,
            file,
            appended_seq,
            bytes_in_epoch: 0,
        })
    }

    /// Appends encoded records with one `write` call and returns the new sequence number.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64, StorageError> {
        self.file.write_all(bytes)?;
        self.bytes_in_epoch += bytes.len() as u64;
        self.appended_seq += 1;
        Ok(self.appended_seq)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends a series record to `out`.
pub fn encode_series(out: &mut Vec<u8>, id: u32, kind: ValueKind, key: &SeriesKey) {
    let mut payload = vec![RECORD_SERIES];
    payload.extend_from_slice(&id.to_le_bytes());
    payload.push(match kind {
        ValueKind::Bool => 0,
        ValueKind::Number => 1,
    });
    put_str(&mut payload, &key.measurement);
    put_str(&mut payload, &key.field);
    payload.extend_from_slice(&(key.tags.len() as u32).to_le_bytes());
    for (k, v) in &key.tags {
        put_str(&mut payload, k);
        put_str(&mut payload, v);
    }
    frame(out, &payload);
}

/// Appends a points record to `out`.
pub fn encode_points(out: &mut Vec<u8>, points: &[(u32, i64, f64)]) {
    let payload_len = 1 + 4 + points.len() * POINT_LEN;
    out.reserve(8 + payload_len);
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let start = out.len();
    out.push(RECORD_POINTS);
    out.extend_from_slice(&(points.len() as u32).to_le_bytes());
    for (id, ts, value) in points {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&ts.to_le_bytes());
        out.extend_from_slice(&value.to_bits().to_le_bytes());
    }
    let crc = crc32fast::hash(&out[start..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at + n)?;
        self.at += n;
        Some(slice)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

fn decode_payload(payload: &[u8]) -> Option<Record> {
    let mut r = Reader {
        bytes: payload,
        at: 1,
    };
    match *payload.first()? {
        RECORD_SERIES => {
            let id = r.u32()?;
            let kind = match r.take(1)?[0] {
                0 => ValueKind::Bool,
                _ => ValueKind::Number,
            };
            let measurement = r.string()?;
            let field = r.string()?;
            let tag_count = r.u32()? as usize;
            let mut tags = Vec::with_capacity(tag_count.min(64));
            for _ in 0..tag_count {
                tags.push((r.string()?, r.string()?));
            }
            Some(Record::Series {
                id,
                kind,
                key: SeriesKey {
                    measurement,
                    tags,
                    field,
                },
            })
        }
        RECORD_POINTS => {
            let count = r.u32()? as usize;
            let mut points = Vec::with_capacity(count.min(payload.len() / POINT_LEN));
            for _ in 0..count {
                let id = r.u32()?;
                let ts = r.u64()?.cast_signed();
                let value = f64::from_bits(r.u64()?);
                points.push((id, ts, value));
            }
            Some(Record::Points(points))
        }
        _ => None,
    }
}

/// Reads every intact record of one WAL file. Returns the records and whether the file
/// ended in a torn or corrupt record.
pub fn read_wal_file(path: &Path) -> Result<(Vec<Record>, bool), StorageError> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut r = Reader {
        bytes: &bytes,
        at: 0,
    };
    while r.at < bytes.len() {
        let record = (|| {
            let len = r.u32()? as usize;
            let crc = r.u32()?;
            let payload = r.take(len)?;
            if crc32fast::hash(payload) != crc {
                return None;
            }
            decode_payload(payload)
        })();
        match record {
            Some(record) => records.push(record),
            None => return Ok((records, true)),
        }
    }
    Ok((records, false))
}
