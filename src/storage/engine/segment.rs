//! Sealed segment files: one compressed chunk per series, written once and never changed.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! "SLSEG003"                         8-byte magic
//! chunk data ...                     per chunk: timestamp column, then value column
//! index: count u32, then per chunk   series, points, min_ts, max_ts - min_ts, ts_len,
//!                                    values_len as LEB128 varints, crc32 u32
//! footer: index_offset u64, index_crc32 u32, "SLSEGEND"
//! ```
//!
//! Index entries are delta-coded. `series` is the difference from the previous entry's
//! series id and `min_ts` the zigzag-encoded difference from the previous entry's
//! `min_ts`, both taken from 0 for the first entry. Differences wrap around like two's
//! complement. A chunk's offset is not stored, because chunks follow each other from
//! byte 8. An entry
//! takes about 12 to 20 bytes instead of version 1's fixed 44 (series u32, points u32,
//! min_ts i64, max_ts i64, offset u64, ts_len u32, values_len u32, crc32 u32).
//!
//! In version 2 each column starts with an encoding byte. Timestamps are either pco
//! (`0`, then a pco stream) or evenly spaced (`1`, then the first timestamp and the step
//! as i64). Values are either pco (`0`) or raw little-endian f64 (`1`). The writer keeps
//! the smaller encoding, because pco's headers (about 50 bytes per column) outweigh the
//! data of short chunks. Version 3 (`"SLSEG003"`, `"SLRUP003"`) writes evenly spaced
//! timestamps as the single byte `2`, because the index entry's `points`, `min_ts` and
//! `max_ts` already define them, and is otherwise version 2. Version 1 files
//! (`"SLSEG001"`, `"SLRUP001"`) hold bare pco columns without the encoding byte. All
//! three versions are read. New segments, including those that compaction writes, are
//! version 3.
//!
//! A segment is written to a `.tmp` file, synced and renamed, so a crash leaves either
//! the whole file or none of it. Chunks are sorted by timestamp with duplicates removed.
//!
//! Rollup segments use the same layout with the magic `"SLRUP003"`. Their timestamps are
//! bucket starts, and their value blob is six pco columns, each prefixed by its length
//! (u32): count, sum, min, max, first and last of the bucket.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use integer_encoding::VarInt;
use pco::ChunkConfig;
use pco::standalone::{simple_compress, simple_decompress};

use crate::storage::StorageError;

use super::memtable::SeriesBuf;
use super::merge::Summary;

const MAGIC_V1: &[u8; 8] = b"SLSEG001";
const ROLLUP_MAGIC_V1: &[u8; 8] = b"SLRUP001";
const MAGIC_V2: &[u8; 8] = b"SLSEG002";
const ROLLUP_MAGIC_V2: &[u8; 8] = b"SLRUP002";
const MAGIC: &[u8; 8] = b"SLSEG003";
const ROLLUP_MAGIC: &[u8; 8] = b"SLRUP003";
/// Encoding byte of a version 2 column: a pco stream follows.
const ENCODING_PCO: u8 = 0;
/// Encoding byte of a version 2 column: evenly spaced timestamps (first, step as i64), or
/// raw f64 values.
const ENCODING_PLAIN: u8 = 1;
/// Encoding byte of a version 3 timestamp column: nothing follows, because the
/// timestamps are evenly spaced from the index entry's `min_ts` to its `max_ts`.
const ENCODING_SPAN: u8 = 2;
const ROLLUP_COLUMNS: usize = 6;
const FOOTER_MAGIC: &[u8; 8] = b"SLSEGEND";
/// Length of a version 1 index entry.
const INDEX_ENTRY_LEN_V1: usize = 44;
const FOOTER_LEN: usize = 20;

/// Where one series' chunk sits in a segment file.
#[derive(Clone, Copy, Debug)]
pub struct ChunkMeta {
    pub series: u32,
    pub points: u32,
    pub min_ts: i64,
    pub max_ts: i64,
    offset: u64,
    ts_len: u32,
    values_len: u32,
    crc: u32,
}

/// An open, immutable segment of one partition.
#[derive(Debug)]
pub struct Segment {
    pub path: PathBuf,
    /// First and last WAL epoch whose data this segment contains. Later epochs win
    /// when two segments store the same series and timestamp.
    pub seq_lo: u64,
    pub seq_hi: u64,
    pub file_len: u64,
    /// Whether the file contains rollup rows instead of raw points.
    pub rollup: bool,
    /// Format version from the magic: 1 has bare pco columns, 2 adds encoding bytes, and 3
    /// adds timestamps implied by the index entry.
    version: u8,
    /// Sorted by series id.
    chunks: Vec<ChunkMeta>,
    file: File,
}

/// The file name of a segment covering WAL epochs `seq_lo..=seq_hi`.
pub fn segment_file_name(seq_lo: u64, seq_hi: u64) -> String {
    format!("seg-{seq_lo:020}-{seq_hi:020}.seg")
}

/// Parses `seg-LO-HI.seg` back into its epoch range.
pub fn parse_segment_file_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("seg-")?.strip_suffix(".seg")?;
    let (lo, hi) = rest.split_once('-')?;
    Some((lo.parse().ok()?, hi.parse().ok()?))
}

fn corrupt(path: &Path, what: &str) -> StorageError {
    StorageError::Database(format!(
        "segment {} is corrupt: {what}; move the file away to open the store without it",
        path.display()
    ))
}

fn codec_error(err: &pco::errors::PcoError) -> StorageError {
    StorageError::Database(format!("pco codec failed: {err}"))
}

/// Sorted, deduplicated rollup rows of one series: bucket starts and their summaries.
#[derive(Debug, Default, Clone)]
pub struct RollupBuf {
    pub ts: Vec<i64>,
    pub rows: Vec<Summary>,
}

/// Writes a segment atomically into `dir` from sorted, deduplicated chunks in series
/// id order. Chunks come from an iterator so that compaction holds one series at a time.
pub fn write_segment(
    dir: &Path,
    seq_lo: u64,
    seq_hi: u64,
    chunks: impl IntoIterator<Item = Result<(u32, SeriesBuf), StorageError>>,
) -> Result<Segment, StorageError> {
    let encoded = chunks.into_iter().map(|chunk| {
        let (series, SeriesBuf { ts, values }) = chunk?;
        let value_bytes = encode_values(&values)?;
        Ok((series, ts, value_bytes))
    });
    write_file(dir, seq_lo, seq_hi, MAGIC, encoded)
}

/// Writes a rollup segment atomically into `dir`, like [`write_segment`].
pub fn write_rollup_segment(
    dir: &Path,
    seq_lo: u64,
    seq_hi: u64,
    chunks: impl IntoIterator<Item = Result<(u32, RollupBuf), StorageError>>,
) -> Result<Segment, StorageError> {
    let encoded = chunks.into_iter().map(|chunk| {
        let (series, RollupBuf { ts, rows }) = chunk?;
        let columns: [fn(&Summary) -> f64; ROLLUP_COLUMNS] = [
            |r| r.count,
            |r| r.sum,
            |r| r.min,
            |r| r.max,
            |r| r.first,
            |r| r.last,
        ];
        let mut value_bytes = Vec::new();
        for column in columns {
            let values: Vec<f64> = rows.iter().map(column).collect();
            let bytes = encode_column(&values)?;
            value_bytes.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            value_bytes.extend_from_slice(&bytes);
        }
        Ok((series, ts, value_bytes))
    });
    write_file(dir, seq_lo, seq_hi, ROLLUP_MAGIC, encoded)
}

fn encode_column(values: &[f64]) -> Result<Vec<u8>, StorageError> {
    simple_compress(values, &ChunkConfig::default()).map_err(|e| codec_error(&e))
}

/// Encodes a raw value column (version 2): pco or plain f64s, whichever is smaller.
fn encode_values(values: &[f64]) -> Result<Vec<u8>, StorageError> {
    let pco = encode_column(values)?;
    let plain_len = values.len() * 8;
    let mut out = Vec::with_capacity(1 + pco.len().min(plain_len));
    if plain_len <= pco.len() {
        out.push(ENCODING_PLAIN);
        for value in values {
            out.extend_from_slice(&value.to_bits().to_le_bytes());
        }
    } else {
        out.push(ENCODING_PCO);
        out.extend_from_slice(&pco);
    }
    Ok(out)
}

/// Computes the step of `points` timestamps evenly spaced from `first` to `last`, or
/// returns `None` when `last - first` is not a multiple of `points - 1`.
fn span_step(first: i64, last: i64, points: usize) -> Option<i128> {
    let gaps = i128::try_from(points.checked_sub(1)?).ok()?;
    let distance = i128::from(last) - i128::from(first);
    if gaps == 0 {
        return (distance == 0).then_some(0);
    }
    (distance % gaps == 0).then_some(distance / gaps)
}

/// Encodes a sorted timestamp column (version 3): only the encoding byte when evenly
/// spaced, else pco.
fn encode_timestamps(ts: &[i64]) -> Result<Vec<u8>, StorageError> {
    let first = i128::from(ts[0]);
    let even = span_step(ts[0], ts[ts.len() - 1], ts.len()).is_some_and(|step| {
        ts.iter()
            .enumerate()
            .all(|(i, &t)| i128::from(t) == first + step * i as i128)
    });
    let mut out = Vec::new();
    if even {
        out.push(ENCODING_SPAN);
    } else {
        out.push(ENCODING_PCO);
        out.extend(simple_compress(ts, &ChunkConfig::default()).map_err(|e| codec_error(&e))?);
    }
    Ok(out)
}

/// Decodes the timestamp column of the chunk described by `meta`, or returns `None` when
/// it is malformed.
fn decode_timestamps(version: u8, bytes: &[u8], meta: &ChunkMeta) -> Option<Vec<i64>> {
    let points = meta.points as usize;
    if version == 1 {
        return simple_decompress::<i64>(bytes).ok();
    }
    let (&encoding, rest) = bytes.split_first()?;
    match encoding {
        ENCODING_PCO => simple_decompress::<i64>(rest).ok(),
        ENCODING_PLAIN if rest.len() == 16 => {
            let first = read_u64(rest, 0).cast_signed();
            let step = read_u64(rest, 8).cast_signed();
            let mut ts = Vec::with_capacity(points.min(1 << 20));
            let mut next = first;
            for _ in 0..points {
                ts.push(next);
                next = next.wrapping_add(step);
            }
            Some(ts)
        }
        ENCODING_SPAN if version >= 3 && rest.is_empty() => {
            let step = span_step(meta.min_ts, meta.max_ts, points)?;
            let first = i128::from(meta.min_ts);
            (0..points)
                .map(|i| i64::try_from(first + step * i as i128).ok())
                .collect()
        }
        _ => None,
    }
}

/// Decodes a raw value column, or returns `None` when it is malformed.
fn decode_values(version: u8, bytes: &[u8]) -> Option<Vec<f64>> {
    if version == 1 {
        return simple_decompress::<f64>(bytes).ok();
    }
    let (&encoding, rest) = bytes.split_first()?;
    match encoding {
        ENCODING_PCO => simple_decompress::<f64>(rest).ok(),
        ENCODING_PLAIN if rest.len() % 8 == 0 => Some(
            rest.chunks_exact(8)
                .map(|b| f64::from_bits(u64::from_le_bytes(b.try_into().expect("8 bytes"))))
                .collect(),
        ),
        _ => None,
    }
}

/// Writes chunks of (series, timestamps, encoded values) to `.tmp`, syncs it and renames
/// it to its final name.
fn write_file(
    dir: &Path,
    seq_lo: u64,
    seq_hi: u64,
    magic: &[u8; 8],
    chunks: impl IntoIterator<Item = Result<(u32, Vec<i64>, Vec<u8>), StorageError>>,
) -> Result<Segment, StorageError> {
    fs::create_dir_all(dir)?;
    let name = segment_file_name(seq_lo, seq_hi);
    let path = dir.join(&name);
    let tmp_path = dir.join(format!("{name}.tmp"));
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp_path)?);
    out.write_all(magic)?;
    let mut offset = magic.len() as u64;
    let mut index = Vec::new();

    for chunk in chunks {
        let (series, ts, value_bytes) = chunk?;
        if ts.is_empty() {
            continue;
        }
        let ts_bytes = encode_timestamps(&ts)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&ts_bytes);
        crc.update(&value_bytes);
        out.write_all(&ts_bytes)?;
        out.write_all(&value_bytes)?;
        index.push(ChunkMeta {
            series,
            points: ts.len() as u32,
            min_ts: ts[0],
            max_ts: ts[ts.len() - 1],
            offset,
            ts_len: ts_bytes.len() as u32,
            values_len: value_bytes.len() as u32,
            crc: crc.finalize(),
        });
        offset += (ts_bytes.len() + value_bytes.len()) as u64;
    }

    let index_bytes = encode_index(&index);
    out.write_all(&index_bytes)?;
    out.write_all(&offset.to_le_bytes())?;
    out.write_all(&crc32fast::hash(&index_bytes).to_le_bytes())?;
    out.write_all(FOOTER_MAGIC)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp_path, &path)?;
    sync_dir(dir)?;
    Segment::open(&path, seq_lo, seq_hi)
}

/// Encodes a version 2 index. Chunks must follow each other from byte 8 in index order.
fn encode_index(index: &[ChunkMeta]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4 + index.len() * 16);
    bytes.extend_from_slice(&(index.len() as u32).to_le_bytes());
    let (mut series, mut min_ts) = (0u32, 0i64);
    for c in index {
        push_varint(&mut bytes, c.series.wrapping_sub(series));
        push_varint(&mut bytes, c.points);
        push_varint(&mut bytes, c.min_ts.wrapping_sub(min_ts));
        push_varint(&mut bytes, c.max_ts.wrapping_sub(c.min_ts).cast_unsigned());
        push_varint(&mut bytes, c.ts_len);
        push_varint(&mut bytes, c.values_len);
        bytes.extend_from_slice(&c.crc.to_le_bytes());
        (series, min_ts) = (c.series, c.min_ts);
    }
    bytes
}

fn push_varint<T: VarInt>(out: &mut Vec<u8>, value: T) {
    let mut buf = [0u8; 10];
    let len = value.encode_var(&mut buf);
    out.extend_from_slice(&buf[..len]);
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes a segment index whose chunk data ends at `data_end`.
fn decode_index(
    path: &Path,
    version: u8,
    bytes: &[u8],
    data_end: u64,
) -> Result<Vec<ChunkMeta>, StorageError> {
    if bytes.len() < 4 {
        return Err(corrupt(path, "index is shorter than its entry count"));
    }
    let mut chunks = if version == 1 {
        decode_index_v1(path, bytes)?
    } else {
        decode_index_v2(bytes, data_end)
            .ok_or_else(|| corrupt(path, "index entries do not match the chunk data"))?
    };
    chunks.sort_by_key(|c| c.series);
    Ok(chunks)
}

fn decode_index_v1(path: &Path, bytes: &[u8]) -> Result<Vec<ChunkMeta>, StorageError> {
    let count = read_u32(bytes, 0) as usize;
    if bytes.len() != 4 + count * INDEX_ENTRY_LEN_V1 {
        return Err(corrupt(path, "index length does not match its entry count"));
    }
    let mut chunks = Vec::with_capacity(count);
    for i in 0..count {
        let at = 4 + i * INDEX_ENTRY_LEN_V1;
        chunks.push(ChunkMeta {
            series: read_u32(bytes, at),
            points: read_u32(bytes, at + 4),
            min_ts: read_u64(bytes, at + 8).cast_signed(),
            max_ts: read_u64(bytes, at + 16).cast_signed(),
            offset: read_u64(bytes, at + 24),
            ts_len: read_u32(bytes, at + 32),
            values_len: read_u32(bytes, at + 36),
            crc: read_u32(bytes, at + 40),
        });
    }
    Ok(chunks)
}

/// Decodes a version 2 index. Returns `None` when an entry is truncated or when the
/// chunks it describes do not end exactly at `data_end`.
fn decode_index_v2(bytes: &[u8], data_end: u64) -> Option<Vec<ChunkMeta>> {
    let count = read_u32(bytes, 0) as usize;
    let mut rest = &bytes[4..];
    // Every entry takes at least 10 bytes, which bounds the allocation for a bad count.
    let mut chunks = Vec::with_capacity(count.min(bytes.len() / 10));
    let (mut series, mut min_ts, mut offset) = (0u32, 0i64, MAGIC.len() as u64);
    for _ in 0..count {
        series = series.wrapping_add(u32::try_from(take_varint::<u64>(&mut rest)?).ok()?);
        let points = u32::try_from(take_varint::<u64>(&mut rest)?).ok()?;
        min_ts = min_ts.wrapping_add(take_varint::<i64>(&mut rest)?);
        let span = take_varint::<u64>(&mut rest)?;
        let ts_len = u32::try_from(take_varint::<u64>(&mut rest)?).ok()?;
        let values_len = u32::try_from(take_varint::<u64>(&mut rest)?).ok()?;
        let (crc, tail) = rest.split_first_chunk::<4>()?;
        rest = tail;
        chunks.push(ChunkMeta {
            series,
            points,
            min_ts,
            max_ts: min_ts.wrapping_add_unsigned(span),
            offset,
            ts_len,
            values_len,
            crc: u32::from_le_bytes(*crc),
        });
        offset = offset.checked_add(u64::from(ts_len) + u64::from(values_len))?;
    }
    (rest.is_empty() && offset == data_end).then_some(chunks)
}

fn take_varint<T: VarInt>(rest: &mut &[u8]) -> Option<T> {
    let (value, len) = T::decode_var(rest)?;
    *rest = &rest[len..];
    Some(value)
}

/// Syncs a directory so that renames and deletions in it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl Segment {
    /// Opens a segment and checks its footer and index.
    pub fn open(path: &Path, seq_lo: u64, seq_hi: u64) -> Result<Segment, StorageError> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        if file_len < (MAGIC.len() + 4 + FOOTER_LEN) as u64 {
            return Err(corrupt(path, "file is shorter than its header and footer"));
        }
        let mut header = [0u8; 8];
        file.read_exact_at(&mut header, 0)?;
        let (rollup, version) = match &header {
            h if h == MAGIC => (false, 3),
            h if h == ROLLUP_MAGIC => (true, 3),
            h if h == MAGIC_V2 => (false, 2),
            h if h == ROLLUP_MAGIC_V2 => (true, 2),
            h if h == MAGIC_V1 => (false, 1),
            h if h == ROLLUP_MAGIC_V1 => (true, 1),
            _ => {
                return Err(corrupt(
                    path,
                    "header magic is missing or names a format version this build cannot read",
                ));
            }
        };
        let mut footer = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut footer, file_len - FOOTER_LEN as u64)?;
        if &footer[12..] != FOOTER_MAGIC {
            return Err(corrupt(path, "footer magic is missing"));
        }
        let index_offset = read_u64(&footer, 0);
        let index_crc = read_u32(&footer, 8);
        let index_end = file_len - FOOTER_LEN as u64;
        if index_offset < MAGIC.len() as u64 || index_offset > index_end {
            return Err(corrupt(path, "index offset is outside the file"));
        }
        let mut index = vec![0u8; (index_end - index_offset) as usize];
        file.read_exact_at(&mut index, index_offset)?;
        if crc32fast::hash(&index) != index_crc {
            return Err(corrupt(path, "index checksum does not match"));
        }
        let chunks = decode_index(path, version, &index, index_offset)?;
        Ok(Segment {
            path: path.to_owned(),
            seq_lo,
            seq_hi,
            file_len,
            rollup,
            version,
            chunks,
            file,
        })
    }

    pub fn chunk(&self, series: u32) -> Option<&ChunkMeta> {
        let i = self
            .chunks
            .binary_search_by_key(&series, |c| c.series)
            .ok()?;
        Some(&self.chunks[i])
    }

    pub fn chunks(&self) -> &[ChunkMeta] {
        &self.chunks
    }

    pub fn point_count(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.points)).sum()
    }

    /// Reads one chunk's timestamp and value blobs, checking its checksum, and decodes the
    /// timestamps.
    fn read_blobs(&self, meta: &ChunkMeta) -> Result<(Vec<i64>, Vec<u8>), StorageError> {
        let total = meta.ts_len as usize + meta.values_len as usize;
        let mut bytes = vec![0u8; total];
        self.file.read_exact_at(&mut bytes, meta.offset)?;
        if crc32fast::hash(&bytes) != meta.crc {
            return Err(corrupt(
                &self.path,
                &format!("chunk of series {} fails its checksum", meta.series),
            ));
        }
        let value_bytes = bytes.split_off(meta.ts_len as usize);
        let Some(ts) = decode_timestamps(self.version, &bytes, meta) else {
            return Err(corrupt(
                &self.path,
                &format!("timestamps of series {} cannot be decoded", meta.series),
            ));
        };
        if ts.len() != meta.points as usize {
            return Err(corrupt(
                &self.path,
                &format!("chunk of series {} has the wrong length", meta.series),
            ));
        }
        Ok((ts, value_bytes))
    }

    /// Reads and decodes one chunk of a raw segment, checking its checksum.
    pub fn read_chunk(&self, meta: &ChunkMeta) -> Result<SeriesBuf, StorageError> {
        if self.rollup {
            return Err(corrupt(
                &self.path,
                "a rollup segment was read as raw points",
            ));
        }
        let (ts, value_bytes) = self.read_blobs(meta)?;
        let Some(values) = decode_values(self.version, &value_bytes) else {
            return Err(corrupt(
                &self.path,
                &format!("values of series {} cannot be decoded", meta.series),
            ));
        };
        if values.len() != meta.points as usize {
            return Err(corrupt(
                &self.path,
                &format!("chunk of series {} has the wrong length", meta.series),
            ));
        }
        Ok(SeriesBuf { ts, values })
    }

    /// Reads and decodes one chunk of a rollup segment, checking its checksum.
    pub fn read_rollup_chunk(&self, meta: &ChunkMeta) -> Result<RollupBuf, StorageError> {
        if !self.rollup {
            return Err(corrupt(&self.path, "a raw segment was read as rollups"));
        }
        let (ts, value_bytes) = self.read_blobs(meta)?;
        let wrong_length = || {
            corrupt(
                &self.path,
                &format!(
                    "rollup chunk of series {} has the wrong length",
                    meta.series
                ),
            )
        };
        let mut columns: Vec<Vec<f64>> = Vec::with_capacity(ROLLUP_COLUMNS);
        let mut rest = value_bytes.as_slice();
        for _ in 0..ROLLUP_COLUMNS {
            if rest.len() < 4 {
                return Err(wrong_length());
            }
            let len = read_u32(rest, 0) as usize;
            let Some(column) = rest.get(4..4 + len) else {
                return Err(wrong_length());
            };
            let values = simple_decompress::<f64>(column).map_err(|e| codec_error(&e))?;
            if values.len() != ts.len() {
                return Err(wrong_length());
            }
            columns.push(values);
            rest = &rest[4 + len..];
        }
        let rows = (0..ts.len())
            .map(|i| Summary {
                count: columns[0][i],
                sum: columns[1][i],
                min: columns[2][i],
                max: columns[3][i],
                first: columns[4][i],
                last: columns[5][i],
            })
            .collect();
        Ok(RollupBuf { ts, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_walk(n: usize) -> Vec<f64> {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut value = 50.0;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                value += (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                value
            })
            .collect()
    }

    fn chunk(ts: Vec<i64>, values: Vec<f64>) -> SeriesBuf {
        SeriesBuf { ts, values }
    }

    #[test]
    fn column_encodings_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let long_even: Vec<i64> = (0..500).map(|i| 1_000 + i * 1_000).collect();
        let uneven = vec![5, 7, 20, 21, 1_000];
        let cases: Vec<(u32, SeriesBuf)> = vec![
            (0, chunk(vec![42], vec![1.5])),
            (1, chunk(long_even.clone(), random_walk(500))),
            (2, chunk(uneven, random_walk(5))),
            (3, chunk(vec![i64::MIN, i64::MAX], vec![f64::MIN, f64::MAX])),
            (4, chunk(long_even, vec![21.5; 500])),
        ];
        let segment = write_segment(dir.path(), 1, 1, cases.clone().into_iter().map(Ok)).unwrap();
        assert_eq!(segment.version, 3);
        for (id, expected) in &cases {
            let meta = segment.chunk(*id).unwrap();
            let read = segment.read_chunk(meta).unwrap();
            assert_eq!(read.ts, expected.ts, "timestamps of chunk {id}");
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&read.values),
                bits(&expected.values),
                "values of chunk {id}"
            );
        }

        let encodings = |id: u32| {
            let meta = *segment.chunk(id).unwrap();
            let mut bytes = vec![0u8; (meta.ts_len + meta.values_len) as usize];
            segment.file.read_exact_at(&mut bytes, meta.offset).unwrap();
            (bytes[0], bytes[meta.ts_len as usize], meta.ts_len)
        };
        // Evenly spaced timestamps take 1 byte however many there are, and so do a single
        // timestamp and the full i64 range.
        for id in [0, 1, 3, 4] {
            assert_eq!(encodings(id).0, ENCODING_SPAN, "timestamps of chunk {id}");
            assert_eq!(encodings(id).2, 1, "timestamp bytes of chunk {id}");
        }
        assert_eq!(encodings(2).0, ENCODING_PCO);
        // Short value columns are smaller raw, long or constant ones smaller in pco.
        assert_eq!(encodings(0).1, ENCODING_PLAIN);
        assert_eq!(encodings(2).1, ENCODING_PLAIN);
        assert_eq!(encodings(1).1, ENCODING_PCO);
        assert_eq!(encodings(4).1, ENCODING_PCO);
    }

    fn encode_index_v1(c: &ChunkMeta) -> Vec<u8> {
        let mut bytes = 1u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&c.series.to_le_bytes());
        bytes.extend_from_slice(&c.points.to_le_bytes());
        bytes.extend_from_slice(&c.min_ts.to_le_bytes());
        bytes.extend_from_slice(&c.max_ts.to_le_bytes());
        bytes.extend_from_slice(&c.offset.to_le_bytes());
        bytes.extend_from_slice(&c.ts_len.to_le_bytes());
        bytes.extend_from_slice(&c.values_len.to_le_bytes());
        bytes.extend_from_slice(&c.crc.to_le_bytes());
        bytes
    }

    #[test]
    fn version_1_segment_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let ts: Vec<i64> = (0..10).map(|i| 60_000 * i).collect();
        let values = random_walk(10);
        let ts_bytes = simple_compress(&ts, &ChunkConfig::default()).unwrap();
        let value_bytes = encode_column(&values).unwrap();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&ts_bytes);
        crc.update(&value_bytes);
        let meta = ChunkMeta {
            series: 7,
            points: 10,
            min_ts: ts[0],
            max_ts: ts[9],
            offset: 8,
            ts_len: ts_bytes.len() as u32,
            values_len: value_bytes.len() as u32,
            crc: crc.finalize(),
        };
        let mut file = MAGIC_V1.to_vec();
        file.extend_from_slice(&ts_bytes);
        file.extend_from_slice(&value_bytes);
        let index_offset = file.len() as u64;
        let index = encode_index_v1(&meta);
        file.extend_from_slice(&index);
        file.extend_from_slice(&index_offset.to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
        file.extend_from_slice(FOOTER_MAGIC);
        let path = dir.path().join(segment_file_name(3, 3));
        fs::write(&path, file).unwrap();

        let segment = Segment::open(&path, 3, 3).unwrap();
        assert_eq!(segment.version, 1);
        let read = segment.read_chunk(segment.chunk(7).unwrap()).unwrap();
        assert_eq!(read.ts, ts);
        assert_eq!(read.values, values);
    }

    #[test]
    fn index_v2_round_trips_and_checks_extent() {
        let meta = |series, min_ts: i64, max_ts, offset, ts_len, values_len| ChunkMeta {
            series,
            points: 3,
            min_ts,
            max_ts,
            offset,
            ts_len,
            values_len,
            crc: 0xDEAD_BEEF,
        };
        let index = vec![
            meta(2, 5_000, 9_000, 8, 17, 25),
            meta(9, i64::MIN, i64::MAX, 50, 60, 70),
            meta(10, -3, -3, 180, 1, 1),
        ];
        let bytes = encode_index(&index);
        assert!(
            bytes.len() < 4 + 3 * INDEX_ENTRY_LEN_V1 / 2,
            "{} bytes",
            bytes.len()
        );
        let decoded = decode_index_v2(&bytes, 182).unwrap();
        for (got, want) in decoded.iter().zip(&index) {
            assert_eq!(
                (got.series, got.points, got.min_ts, got.max_ts, got.offset),
                (
                    want.series,
                    want.points,
                    want.min_ts,
                    want.max_ts,
                    want.offset
                )
            );
            assert_eq!(
                (got.ts_len, got.values_len, got.crc),
                (want.ts_len, want.values_len, want.crc)
            );
        }
        assert!(
            decode_index_v2(&bytes, 183).is_none(),
            "chunks must end at the index"
        );
        assert!(
            decode_index_v2(&bytes[..bytes.len() - 1], 182).is_none(),
            "truncated entry"
        );
    }

    #[test]
    fn unknown_magic_is_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_file_name(1, 1));
        let mut file = b"SLSEG099".to_vec();
        file.extend_from_slice(&[0u8; 4 + FOOTER_LEN]);
        fs::write(&path, file).unwrap();
        let err = Segment::open(&path, 1, 1).unwrap_err().to_string();
        assert!(err.contains("format version"), "{err}");
        assert!(err.contains("move the file away"), "{err}");
    }
}
