//! The series index: ids, keys and value kinds, kept in memory and persisted in SQLite.
//!
//! New series are first recorded in the WAL. A checkpoint copies them into `index.sqlite`
//! before it deletes the WAL files that declared them, so every id a segment uses is in
//! SQLite or in a surviving WAL file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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

/// The SQLite file that persists the catalog and the retention floor.
pub struct IndexDb {
    conn: Connection,
    persisted: usize,
}

impl IndexDb {
    pub fn open(path: &Path) -> Result<IndexDb, StorageError> {
        let conn = Connection::open(path).map_err(|e| db_error(&e))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS series (
                 id INTEGER PRIMARY KEY,
                 measurement TEXT NOT NULL,
                 tags TEXT NOT NULL,
                 field TEXT NOT NULL,
                 kind TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .map_err(|e| db_error(&e))?;
        Ok(IndexDb { conn, persisted: 0 })
    }

    /// Loads every persisted series into a new catalog.
    pub fn load(&mut self) -> Result<Catalog, StorageError> {
        let mut catalog = Catalog::default();
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
        for row in rows {
            let (id, measurement, tags, field, kind) = row.map_err(|e| db_error(&e))?;
            let tags: Vec<(String, String)> = serde_json::from_str(&tags).map_err(|e| {
                StorageError::Database(format!("series {id} has invalid tags in the index: {e}"))
            })?;
            let kind = if kind == "bool" {
                ValueKind::Bool
            } else {
                ValueKind::Number
            };
            catalog.insert(
                id,
                SeriesKey {
                    measurement,
                    tags,
                    field,
                },
                kind,
            )?;
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
        {
            let mut stmt = tx
                .prepare("INSERT OR REPLACE INTO series (id, measurement, tags, field, kind) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(|e| db_error(&e))?;
            for (id, key, kind) in entries {
                let tags = serde_json::to_string(&key.tags).expect("tags serialize");
                let kind = match kind {
                    ValueKind::Bool => "bool",
                    ValueKind::Number => "number",
                };
                stmt.execute(params![id, key.measurement, tags, key.field, kind])
                    .map_err(|e| db_error(&e))?;
            }
        }
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
