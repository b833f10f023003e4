//! A time-series store on SQLite: simple, durable, and the reference that the tuned
//! engine is checked against.
//!
//! One writer thread owns the write connection and commits in groups: every
//! `commit_interval`, or sooner when many points are waiting. Queries use their own
//! connection, which WAL mode lets read while the writer writes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Aggregate, Point, Query, Selector, SeriesData, SeriesKey, StorageError, TimeSeriesStore,
};
use crate::model::{Timestamp, Value, ValueKind};

/// Points waiting for the writer before it commits without waiting for the interval.
const EAGER_COMMIT_POINTS: usize = 20_000;

enum WriterMessage {
    Points(Vec<Point>),
    Flush(mpsc::Sender<Result<(), String>>),
}

type SeriesCache = Arc<Mutex<HashMap<SeriesKey, (i64, ValueKind)>>>;

/// The SQLite store.
pub struct SqliteStore {
    writer: Mutex<Option<mpsc::Sender<WriterMessage>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Mutex<Connection>,
    series: SeriesCache,
    commit_interval: Duration,
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "used as a `map_err` function"
)]
fn db_error(e: rusqlite::Error) -> StorageError {
    StorageError::Database(e.to_string())
}

impl SqliteStore {
    /// Opens or creates the store in `dir`.
    pub fn open(dir: &Path, commit_interval: Duration) -> Result<SqliteStore, StorageError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("series.sqlite");
        let writer_conn = Connection::open(&path).map_err(db_error)?;
        writer_conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA busy_timeout = 5000;
                 CREATE TABLE IF NOT EXISTS series (
                     id INTEGER PRIMARY KEY,
                     measurement TEXT NOT NULL,
                     tags TEXT NOT NULL,
                     field TEXT NOT NULL,
                     kind TEXT NOT NULL,
                     UNIQUE (measurement, tags, field)
                 );
                 CREATE TABLE IF NOT EXISTS points (
                     series_id INTEGER NOT NULL,
                     ts INTEGER NOT NULL,
                     value REAL NOT NULL,
                     PRIMARY KEY (series_id, ts)
                 ) WITHOUT ROWID;
                 CREATE INDEX IF NOT EXISTS points_ts ON points (ts);",
            )
            .map_err(db_error)?;
        let reader = Connection::open(&path).map_err(db_error)?;
        // Readers can meet a busy database while the writer checkpoints the WAL, and
        // retention deletes through this connection.
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(db_error)?;
        let series = Arc::new(Mutex::new(load_series(&reader)?));

        let (tx, rx) = mpsc::channel();
        let writer_series = Arc::clone(&series);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || run_writer(writer_conn, &rx, &writer_series, commit_interval))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            reader: Mutex::new(reader),
            series,
            commit_interval,
        })
    }

    fn send(&self, message: WriterMessage) -> Result<(), StorageError> {
        let writer = lock(&self.writer);
        writer
            .as_ref()
            .ok_or(StorageError::Closed)?
            .send(message)
            .map_err(|_| StorageError::Closed)
    }

    /// Flushes and stops the writer thread.
    pub fn close(&self) -> Result<(), StorageError> {
        let flushed = self.flush();
        lock(&self.writer).take();
        if let Some(thread) = lock(&self.writer_thread).take() {
            let _ = thread.join();
        }
        flushed
    }

    fn matching_series(&self, selector: &Selector) -> Vec<(SeriesKey, i64, ValueKind)> {
        let series = lock(&self.series);
        let mut found: Vec<_> = series
            .iter()
            .filter(|(k, _)| selector.matches(k))
            .map(|(k, (id, kind))| (k.clone(), *id, *kind))
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn kind_name(kind: ValueKind) -> &'static str {
    match kind {
        ValueKind::Bool => "bool",
        ValueKind::Number => "number",
    }
}

fn encode_tags(tags: &[(String, String)]) -> String {
    serde_json::to_string(tags).unwrap_or_default()
}

fn load_series(conn: &Connection) -> Result<HashMap<SeriesKey, (i64, ValueKind)>, StorageError> {
    let mut statement = conn
        .prepare("SELECT id, measurement, tags, field, kind FROM series")
        .map_err(db_error)?;
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
            ))
        })
        .map_err(db_error)?;
    let mut series = HashMap::new();
    for row in rows {
        let (id, measurement, tags, field, kind) = row.map_err(db_error)?;
        let tags: Vec<(String, String)> = serde_json::from_str(&tags).unwrap_or_default();
        let kind = if kind == "bool" {
            ValueKind::Bool
        } else {
            ValueKind::Number
        };
        series.insert(
            SeriesKey {
                measurement,
                tags,
                field,
            },
            (id, kind),
        );
    }
    Ok(series)
}

fn run_writer(
    mut conn: Connection,
    rx: &mpsc::Receiver<WriterMessage>,
    series: &SeriesCache,
    interval: Duration,
) {
    let mut pending: Vec<Point> = Vec::new();
    let mut waiters: Vec<mpsc::Sender<Result<(), String>>> = Vec::new();
    let mut deadline: Option<Instant> = None;
    loop {
        let timeout = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        let mut closed = false;
        match rx.recv_timeout(timeout) {
            Ok(WriterMessage::Points(points)) => {
                deadline.get_or_insert_with(|| Instant::now() + interval);
                pending.extend(points);
            }
            Ok(WriterMessage::Flush(done)) => waiters.push(done),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => closed = true,
        }
        let due = deadline.is_some_and(|d| Instant::now() >= d);
        if due || closed || !waiters.is_empty() || pending.len() >= EAGER_COMMIT_POINTS {
            let result = commit(&mut conn, std::mem::take(&mut pending), series);
            if let Err(e) = &result {
                tracing::error!(error = %e, "storing readings failed; the points of this commit are lost");
            }
            for waiter in waiters.drain(..) {
                let _ = waiter.send(result.clone());
            }
            deadline = None;
        }
        if closed {
            return;
        }
    }
}

fn commit(conn: &mut Connection, points: Vec<Point>, series: &SeriesCache) -> Result<(), String> {
    if points.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    {
        let mut insert_point = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO points (series_id, ts, value) VALUES (?1, ?2, ?3)",
            )
            .map_err(|e| e.to_string())?;
        for point in points {
            let id = series_id(&tx, series, &point.series, point.value.kind())
                .map_err(|e| e.to_string())?;
            insert_point
                .execute(params![id, point.ts.0, point.value.as_f64()])
                .map_err(|e| e.to_string())?;
        }
    }
    tx.commit().map_err(|e| e.to_string())
}

fn series_id(
    tx: &rusqlite::Transaction<'_>,
    series: &SeriesCache,
    key: &SeriesKey,
    kind: ValueKind,
) -> rusqlite::Result<i64> {
    if let Some((id, _)) = lock(series).get(key) {
        return Ok(*id);
    }
    let tags = encode_tags(&key.tags);
    tx.execute(
        "INSERT OR IGNORE INTO series (measurement, tags, field, kind) VALUES (?1, ?2, ?3, ?4)",
        params![key.measurement, tags, key.field, kind_name(kind)],
    )?;
    let id: i64 = tx.query_row(
        "SELECT id FROM series WHERE measurement = ?1 AND tags = ?2 AND field = ?3",
        params![key.measurement, tags, key.field],
        |row| row.get(0),
    )?;
    lock(series).insert(key.clone(), (id, kind));
    Ok(id)
}

impl TimeSeriesStore for SqliteStore {
    fn write(&self, points: Vec<Point>) -> Result<(), StorageError> {
        // Kinds are checked here, so a mismatch is reported to the caller instead of
        // failing a whole commit later.
        {
            let series = lock(&self.series);
            for point in &points {
                if let Some((_, stored)) = series.get(&point.series)
                    && *stored != point.value.kind()
                {
                    return Err(StorageError::KindMismatch {
                        series: format!("{}.{}", point.series.measurement, point.series.field),
                        stored: *stored,
                        offered: point.value.kind(),
                    });
                }
            }
        }
        self.send(WriterMessage::Points(points))
    }

    fn query(&self, query: &Query) -> Result<Vec<SeriesData>, StorageError> {
        if query.to.0 <= query.from.0 {
            return Ok(Vec::new());
        }
        let matching = self.matching_series(&query.selector);
        let reader = lock(&self.reader);
        let mut results = Vec::with_capacity(matching.len());
        for (key, id, kind) in matching {
            let points = match query.aggregation {
                None => query_raw(&reader, id, kind, query)?,
                Some((step, aggregate)) => {
                    query_aggregated(&reader, id, kind, query, step, aggregate)?
                }
            };
            results.push(SeriesData {
                series: key,
                kind,
                points,
            });
        }
        Ok(results)
    }

    fn latest(
        &self,
        selector: &Selector,
    ) -> Result<Vec<(SeriesKey, Timestamp, Value)>, StorageError> {
        let mut out = Vec::new();
        for (key, _, _) in self.matching_series(selector) {
            if let Some((ts, value)) = latest(self, &key)? {
                out.push((key, ts, value));
            }
        }
        Ok(out)
    }

    fn series(&self, selector: &Selector) -> Result<Vec<SeriesKey>, StorageError> {
        Ok(self
            .matching_series(selector)
            .into_iter()
            .map(|(k, _, _)| k)
            .collect())
    }

    fn flush(&self) -> Result<(), StorageError> {
        let (tx, rx) = mpsc::channel();
        self.send(WriterMessage::Flush(tx))?;
        rx.recv()
            .map_err(|_| StorageError::Closed)?
            .map_err(StorageError::Database)
    }

    fn enforce_retention(&self, cutoff: Timestamp) -> Result<u64, StorageError> {
        let reader = lock(&self.reader);
        let deleted = reader
            .execute("DELETE FROM points WHERE ts < ?1", params![cutoff.0])
            .map_err(db_error)?;
        Ok(deleted as u64)
    }

    fn commit_interval(&self) -> Duration {
        self.commit_interval
    }
}

fn limit_of(query: &Query) -> i64 {
    query
        .limit
        .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

fn query_raw(
    conn: &Connection,
    id: i64,
    kind: ValueKind,
    query: &Query,
) -> Result<Vec<(Timestamp, Value)>, StorageError> {
    let mut statement = conn
        .prepare_cached("SELECT ts, value FROM points WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3 ORDER BY ts LIMIT ?4")
        .map_err(db_error)?;
    let rows = statement
        .query_map(
            params![id, query.from.0, query.to.0, limit_of(query)],
            |row| {
                Ok((
                    Timestamp(row.get(0)?),
                    Value::from_stored(row.get(1)?, kind),
                ))
            },
        )
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

fn query_aggregated(
    conn: &Connection,
    id: i64,
    kind: ValueKind,
    query: &Query,
    step: Duration,
    aggregate: Aggregate,
) -> Result<Vec<(Timestamp, Value)>, StorageError> {
    let step_ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
    if step_ms <= 0 {
        return Err(StorageError::InvalidQuery(
            "step must be at least 1 ms".to_owned(),
        ));
    }
    // Steps are aligned to multiples of the step since the epoch, as Grafana and InfluxDB
    // align `GROUP BY time()`.
    let bucket = "(ts - ((ts % ?4) + ?4) % ?4)";
    // For `first` and `last`, SQLite takes a bare column from the row that holds the
    // group's MIN(ts) or MAX(ts), which is the first or last point of the step.
    let (expression, selector) = match aggregate {
        Aggregate::Mean => ("AVG(value)", ""),
        Aggregate::Min => ("MIN(value)", ""),
        Aggregate::Max => ("MAX(value)", ""),
        Aggregate::Sum => ("SUM(value)", ""),
        Aggregate::Count => ("COUNT(*)", ""),
        Aggregate::First => ("value", ", MIN(ts)"),
        Aggregate::Last => ("value", ", MAX(ts)"),
    };
    let sql = format!(
        "SELECT {bucket} AS bucket, {expression}{selector} FROM points \
         WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY bucket ORDER BY bucket LIMIT ?5"
    );
    let mut statement = conn.prepare_cached(&sql).map_err(db_error)?;
    let keeps_kind = matches!(
        aggregate,
        Aggregate::First | Aggregate::Last | Aggregate::Min | Aggregate::Max
    );
    let rows = statement
        .query_map(
            params![id, query.from.0, query.to.0, step_ms, limit_of(query)],
            |row| {
                let number: f64 = row.get(1)?;
                let value = if keeps_kind {
                    Value::from_stored(number, kind)
                } else {
                    Value::Number(number)
                };
                Ok((Timestamp(row.get(0)?), value))
            },
        )
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

/// Returns the latest stored point of a series, if any.
pub fn latest(
    store: &SqliteStore,
    key: &SeriesKey,
) -> Result<Option<(Timestamp, Value)>, StorageError> {
    let Some((id, kind)) = lock(&store.series).get(key).copied() else {
        return Ok(None);
    };
    let reader = lock(&store.reader);
    reader
        .query_row(
            "SELECT ts, value FROM points WHERE series_id = ?1 ORDER BY ts DESC LIMIT 1",
            params![id],
            |row| {
                Ok((
                    Timestamp(row.get(0)?),
                    Value::from_stored(row.get(1)?, kind),
                ))
            },
        )
        .optional()
        .map_err(db_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(device: &str) -> SeriesKey {
        SeriesKey::new(
            "gas-detector",
            vec![
                ("site".into(), "a".into()),
                ("device".into(), device.into()),
            ],
            "gas_lel",
        )
    }

    fn point(device: &str, ts: i64, v: f64) -> Point {
        Point {
            series: key(device),
            ts: Timestamp(ts),
            value: Value::Number(v),
        }
    }

    fn all(selector: Selector) -> Query {
        Query {
            selector,
            from: Timestamp(0),
            to: Timestamp(i64::MAX),
            aggregation: None,
            limit: None,
        }
    }

    #[test]
    fn write_flush_query_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SqliteStore::open(dir.path(), Duration::from_millis(50)).unwrap();
            store
                .write(vec![
                    point("d1", 2000, 2.0),
                    point("d1", 1000, 1.0),
                    point("d2", 1000, 5.0),
                ])
                .unwrap();
            store.write(vec![point("d1", 2000, 2.5)]).unwrap();
            store.flush().unwrap();
            let data = store
                .query(&all(Selector {
                    tags: vec![("device".into(), "d1".into())],
                    ..Default::default()
                }))
                .unwrap();
            assert_eq!(data.len(), 1);
            assert_eq!(
                data[0].points,
                vec![
                    (Timestamp(1000), Value::Number(1.0)),
                    (Timestamp(2000), Value::Number(2.5))
                ]
            );
        }
        let store = SqliteStore::open(dir.path(), Duration::from_millis(50)).unwrap();
        let data = store.query(&all(Selector::default())).unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data.iter().map(|d| d.points.len()).sum::<usize>(), 3);
    }

    #[test]
    fn aggregates_align_to_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Duration::from_millis(50)).unwrap();
        store
            .write((0..120).map(|i| point("d1", i * 1000, i as f64)).collect())
            .unwrap();
        store.flush().unwrap();
        let expect = [
            (Aggregate::Mean, [29.5, 89.5]),
            (Aggregate::Min, [0.0, 60.0]),
            (Aggregate::Max, [59.0, 119.0]),
            (Aggregate::First, [0.0, 60.0]),
            (Aggregate::Last, [59.0, 119.0]),
            (Aggregate::Sum, [1770.0, 5370.0]),
            (Aggregate::Count, [60.0, 60.0]),
        ];
        for (aggregate, values) in expect {
            let mut query = all(Selector::default());
            query.aggregation = Some((Duration::from_secs(60), aggregate));
            let data = store.query(&query).unwrap();
            let got: Vec<(i64, f64)> = data[0]
                .points
                .iter()
                .map(|(t, v)| (t.0, v.as_f64()))
                .collect();
            assert_eq!(
                got,
                vec![(0, values[0]), (60_000, values[1])],
                "{aggregate:?}"
            );
        }
    }

    #[test]
    fn kind_mismatch_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Duration::from_millis(50)).unwrap();
        store.write(vec![point("d1", 1, 1.0)]).unwrap();
        store.flush().unwrap();
        let bad = Point {
            series: key("d1"),
            ts: Timestamp(2),
            value: Value::Bool(true),
        };
        assert!(matches!(
            store.write(vec![bad]),
            Err(StorageError::KindMismatch { .. })
        ));
    }

    #[test]
    fn retention_deletes_old_points() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Duration::from_millis(50)).unwrap();
        store
            .write(vec![point("d1", 1000, 1.0), point("d1", 5000, 5.0)])
            .unwrap();
        store.flush().unwrap();
        assert_eq!(store.enforce_retention(Timestamp(2000)).unwrap(), 1);
        let data = store.query(&all(Selector::default())).unwrap();
        assert_eq!(data[0].points, vec![(Timestamp(5000), Value::Number(5.0))]);
    }
}
