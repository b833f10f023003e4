//! The series index: ids, keys and value kinds, kept in memory and persisted in SQLite.
//!
//! New series are first recorded in the WAL. A checkpoint copies them into `index.sqlite`
//! before it deletes the WAL files that declared them, so every id a segment uses is in
//! SQLite or in a surviving WAL file.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use integer_encoding::VarInt;
use rusqlite::{Connection, params};

use crate::model::ValueKind;
use crate::storage::{Selector, SeriesKey, StorageError};

fn db_error(err: &rusqlite::Error) -> StorageError {
    StorageError::Database(format!("series index (SQLite) failed: {err}"))
}

/// In-memory view of every series.
#[derive(Debug, Default)]
pub struct Catalog {
    ids: HashMap<SeriesKey, u32, foldhash::fast::RandomState>,
    /// Indexed by series id.
    entries: Vec<(SeriesKey, ValueKind)>,
    by_measurement: BTreeMap<String, Vec<u32>>,
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn id(&self, key: &SeriesKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn entry(&self, id: u32) -> &(SeriesKey, ValueKind) {
        &self.entries[id as usize]
    }

    /// Adds a series under the next id, which must equal `id`.
    pub fn insert(&mut self, id: u32, key: SeriesKey, kind: ValueKind) -> Result<(), StorageError> {
        if id as usize != self.entries.len() {
            return Err(StorageError::Database(format!(
                "series index expected id {} but the log declares id {id} for {key:?}",
                self.entries.len()
            )));
        }
        self.by_measurement
            .entry(key.measurement.clone())
            .or_default()
            .push(id);
        self.ids.insert(key.clone(), id);
        self.entries.push((key, kind));
        Ok(())
    }

    /// Copies the series with ids from `start` on.
    pub fn entries_from(&self, start: usize) -> Vec<(u32, SeriesKey, ValueKind)> {
        let tail = self.entries.get(start..).unwrap_or_default();
        tail.iter()
            .enumerate()
            .map(|(i, (key, kind))| ((start + i) as u32, key.clone(), *kind))
            .collect()
    }

    /// Ids of the series that match `selector`, in id order.
    pub fn select(&self, selector: &Selector) -> Vec<u32> {
        let matches = |id: &u32| selector.matches(&self.entries[*id as usize].0);
        match &selector.measurement {
            Some(m) => self.by_measurement.get(m).map_or_else(Vec::new, |ids| {
                ids.iter().copied().filter(matches).collect()
            }),
            None => (0..self.entries.len() as u32).filter(matches).collect(),
        }
    }
}

/// Most series stored in one row of the `series` table.
const MAX_SERIES_PER_BLOCK: usize = 65_536;

/// Columns of the version 1 `series` table, one row per series.
const LEGACY_COLUMNS: &str = "measurement";

/// The SQLite file that persists the catalog and the retention floor.
///
/// The `series` table stores blocks of consecutive series, one row per block:
/// `first_id`, `count`, and `keys`, the deflate-compressed records of the series in id
/// order. A record is the kind byte (0 number, 1 bool), the measurement, the number of
/// tags, each tag key and value, and the field, with every string and count prefixed by
/// its LEB128 length. Series keys repeat most of their bytes, so a block takes about
/// a tenth of the size of one row per series.
pub struct IndexDb {
    conn: Connection,
    persisted: usize,
}

impl IndexDb {
    /// Opens or creates the index, converting a version 1 index (one row per series) in
    /// place.
    pub fn open(path: &Path) -> Result<IndexDb, StorageError> {
        let conn = Connection::open(path).map_err(|e| db_error(&e))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(|e| db_error(&e))?;
        let mut db = IndexDb { conn, persisted: 0 };
        if db.has_legacy_table()? {
            db.migrate_legacy_table(path)?;
        }
        db.conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS series (
                     first_id INTEGER PRIMARY KEY,
                     count INTEGER NOT NULL,
                     keys BLOB NOT NULL
                 );",
            )
            .map_err(|e| db_error(&e))?;
        Ok(db)
    }

    fn has_legacy_table(&self) -> Result<bool, StorageError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM pragma_table_info('series')")
            .map_err(|e| db_error(&e))?;
        let columns = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(|e| db_error(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error(&e))?;
        Ok(columns.iter().any(|c| c == LEGACY_COLUMNS))
    }

    /// Rewrites a version 1 `series` table (one row per series, tags as JSON) as blocks
    /// in one transaction, then runs `VACUUM` to return the freed pages to the file
    /// system. A crash before the commit leaves the version 1 table, which the next open
    /// converts again.
    fn migrate_legacy_table(&mut self, path: &Path) -> Result<(), StorageError> {
        let entries = self.load_legacy_rows()?;
        let tx = self.conn.transaction().map_err(|e| db_error(&e))?;
        tx.execute_batch(
            "DROP TABLE series;
             CREATE TABLE series (
                 first_id INTEGER PRIMARY KEY,
                 count INTEGER NOT NULL,
                 keys BLOB NOT NULL
             );",
        )
        .map_err(|e| db_error(&e))?;
        insert_blocks(&tx, &entries)?;
        tx.commit().map_err(|e| db_error(&e))?;
        self.conn
            .execute_batch("VACUUM;")
            .map_err(|e| db_error(&e))?;
        tracing::info!(
            path = %path.display(),
            series = entries.len(),
            "converted the series index to blocks (index format 2)"
        );
        Ok(())
    }

    fn load_legacy_rows(&self) -> Result<Vec<(u32, SeriesKey, ValueKind)>, StorageError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, measurement, tags, field, kind FROM series ORDER BY id")
            .map_err(|e| db_error(&e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, u32>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })
            .map_err(|e| db_error(&e))?;
        let mut entries = Vec::new();
        for row in rows {
            let (id, measurement, tags, field, kind) = row.map_err(|e| db_error(&e))?;
            if id as usize != entries.len() {
                return Err(StorageError::Database(format!(
                    "series index (format 1) expected id {} but found id {id}; the ids must \
                     be consecutive from 0, so restore index.sqlite from a backup",
                    entries.len()
                )));
            }
            let tags: Vec<(String, String)> = serde_json::from_str(&tags).map_err(|e| {
                StorageError::Database(format!("series {id} has invalid tags in the index: {e}"))
            })?;
            let kind = if kind == "bool" {
                ValueKind::Bool
            } else {
                ValueKind::Number
            };
            let key = SeriesKey {
                measurement,
                tags,
                field,
            };
            entries.push((id, key, kind));
        }
        Ok(entries)
    }

    /// Loads every persisted series into a new catalog.
    pub fn load(&mut self) -> Result<Catalog, StorageError> {
        let mut catalog = Catalog::default();
        let mut stmt = self
            .conn
            .prepare("SELECT first_id, count, keys FROM series ORDER BY first_id")
            .map_err(|e| db_error(&e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, u32>(0)?,
                    row.get::<_, u32>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(|e| db_error(&e))?;
        for row in rows {
            let (first_id, count, keys) = row.map_err(|e| db_error(&e))?;
            let series = decode_block(&keys, count as usize).ok_or_else(|| {
                StorageError::Database(format!(
                    "series index block at id {first_id} is corrupt: it does not decode to \
                     {count} series; restore index.sqlite from a backup"
                ))
            })?;
            for (i, (key, kind)) in series.into_iter().enumerate() {
                catalog.insert(first_id + i as u32, key, kind)?;
            }
        }
        self.persisted = catalog.len();
        Ok(catalog)
    }

    /// Number of series ids already in SQLite.
    pub fn persisted(&self) -> usize {
        self.persisted
    }

    /// Persists series copied with [`Catalog::entries_from`], in one transaction.
    pub fn persist(&mut self, entries: &[(u32, SeriesKey, ValueKind)]) -> Result<(), StorageError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let tx = self.conn.transaction().map_err(|e| db_error(&e))?;
        insert_blocks(&tx, entries)?;
        tx.commit().map_err(|e| db_error(&e))?;
        self.persisted = self.persisted.max(last.0 as usize + 1);
        Ok(())
    }

    pub fn meta(&self, key: &str) -> Result<Option<i64>, StorageError> {
        let mut stmt = self
            .conn
            .prepare("SELECT value FROM meta WHERE key = ?1")
            .map_err(|e| db_error(&e))?;
        let mut rows = stmt.query(params![key]).map_err(|e| db_error(&e))?;
        match rows.next().map_err(|e| db_error(&e))? {
            Some(row) => Ok(Some(row.get(0).map_err(|e| db_error(&e))?)),
            None => Ok(None),
        }
    }

    pub fn set_meta(&self, key: &str, value: i64) -> Result<(), StorageError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(|e| db_error(&e))?;
        Ok(())
    }
}

/// Inserts `entries`, consecutive ids in order, as blocks of up to
/// [`MAX_SERIES_PER_BLOCK`] series.
fn insert_blocks(
    tx: &rusqlite::Transaction<'_>,
    entries: &[(u32, SeriesKey, ValueKind)],
) -> Result<(), StorageError> {
    let mut stmt = tx
        .prepare("INSERT OR REPLACE INTO series (first_id, count, keys) VALUES (?1, ?2, ?3)")
        .map_err(|e| db_error(&e))?;
    for block in entries.chunks(MAX_SERIES_PER_BLOCK) {
        let keys = encode_block(block)?;
        stmt.execute(params![block[0].0, block.len() as u32, keys])
            .map_err(|e| db_error(&e))?;
    }
    Ok(())
}

fn encode_block(block: &[(u32, SeriesKey, ValueKind)]) -> Result<Vec<u8>, StorageError> {
    let mut raw = Vec::with_capacity(block.len() * 48);
    for (_, key, kind) in block {
        raw.push(match kind {
            ValueKind::Number => 0,
            ValueKind::Bool => 1,
        });
        push_str(&mut raw, &key.measurement);
        push_len(&mut raw, key.tags.len());
        for (tag, value) in &key.tags {
            push_str(&mut raw, tag);
            push_str(&mut raw, value);
        }
        push_str(&mut raw, &key.field);
    }
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(&raw)?;
    Ok(encoder.finish()?)
}

/// Decodes `count` series from a block, or returns `None` when the block is malformed.
fn decode_block(bytes: &[u8], count: usize) -> Option<Vec<(SeriesKey, ValueKind)>> {
    let mut raw = Vec::new();
    DeflateDecoder::new(bytes).read_to_end(&mut raw).ok()?;
    let mut rest = raw.as_slice();
    let mut series = Vec::with_capacity(count.min(MAX_SERIES_PER_BLOCK));
    for _ in 0..count {
        let (&kind, tail) = rest.split_first()?;
        rest = tail;
        let kind = match kind {
            0 => ValueKind::Number,
            1 => ValueKind::Bool,
            _ => return None,
        };
        let measurement = take_str(&mut rest)?;
        let tag_count = take_len(&mut rest)?;
        let mut tags = Vec::with_capacity(tag_count.min(rest.len()));
        for _ in 0..tag_count {
            tags.push((take_str(&mut rest)?, take_str(&mut rest)?));
        }
        let field = take_str(&mut rest)?;
        let key = SeriesKey {
            measurement,
            tags,
            field,
        };
        series.push((key, kind));
    }
    rest.is_empty().then_some(series)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    let mut buf = [0u8; 10];
    let n = (len as u64).encode_var(&mut buf);
    out.extend_from_slice(&buf[..n]);
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    push_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn take_len(rest: &mut &[u8]) -> Option<usize> {
    let (len, n) = u64::decode_var(rest)?;
    *rest = &rest[n..];
    usize::try_from(len).ok()
}

fn take_str(rest: &mut &[u8]) -> Option<String> {
    let len = take_len(rest)?;
    if len > rest.len() {
        return None;
    }
    let (s, tail) = rest.split_at(len);
    *rest = tail;
    String::from_utf8(s.to_vec()).ok()
}
