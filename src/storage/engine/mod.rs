//! The embedded time-series engine: a write-ahead log with group commit, sharded
//! memtables, and sealed, pco-compressed column chunks per series in time partitions.
//!
//! Data flow: [`Engine::write`] appends to the WAL and the active memtable. A checkpoint
//! freezes the memtable, starts a new WAL epoch, seals the frozen points into one segment
//! per partition, and then deletes the old WAL files. Compaction merges the segments of a
//! partition, and retention deletes whole partitions. Optional rollup tiers summarize
//! sealed partitions per bucket and outlive raw data (see [`RollupTier`]). The series
//! index is SQLite. The on-disk format and its invariants are described in
//! `docs/storage.md`.

mod catalog;
mod maintenance;
mod memtable;
mod merge;
mod metrics;
mod rollup;
mod segment;
mod wal;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{Timestamp, Value, ValueKind};
use crate::storage::{
    Point, Query, Selector, SeriesData, SeriesKey, StorageError, TimeSeriesStore,
};

use catalog::{Catalog, IndexDb};
use memtable::{Frozen, Memtable, SeriesBuf};
use segment::Segment;
use wal::{Record, WalWriter};

pub use metrics::EngineMetrics;
pub use rollup::RollupTier;

/// Estimated memory per buffered point: 16 bytes of data plus vector growth slack.
const BYTES_PER_POINT: usize = 24;
const RETENTION_FLOOR_KEY: &str = "retention_floor_ms";
/// Series id that `resolve_series` gives to points rejected by `max_series`. Ids count up
/// from 0, so a real id reaches it only in an index of 2^32 series.
const REJECTED: u32 = u32::MAX;
/// Default of [`EngineOptions::max_series`].
pub const DEFAULT_MAX_SERIES: usize = 1_000_000;
/// Minimum time between two WARN lines about rejected series.
const SERIES_LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Tuning of an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Maximum time between an acknowledged write and its `fsync` (group commit).
    pub commit_interval: Duration,
    /// Maximum time points stay in the memtable and the WAL before they are sealed.
    pub checkpoint_interval: Duration,
    /// A checkpoint also starts when the current WAL file reaches this size.
    pub wal_max_bytes: u64,
    /// Memory for unsealed points. A checkpoint starts at half of it, and writers wait
    /// (back-pressure) while the whole budget is in use.
    pub memory_budget_bytes: usize,
    /// How long a writer waits for memory before its write fails.
    pub backpressure_timeout: Duration,
    /// Width of a time partition; retention deletes whole partitions.
    pub partition_duration: Duration,
    /// Compaction merges a partition once it has this many segments.
    pub compaction_min_segments: usize,
    /// Raw retention that the caller of `enforce_retention` applies. Each rollup tier's
    /// cutoff is the raw cutoff moved back by the tier's extra retention.
    pub retention: Duration,
    /// Downsampling tiers, finest first; empty keeps raw data only.
    pub rollups: Vec<RollupTier>,
    /// Maximum number of series in the index, which is kept in memory. 0 means no limit.
    /// Points that would create a series beyond it are rejected, and the other points of
    /// the write are stored.
    pub max_series: usize,
    /// Measurements whose series neither count toward `max_series` nor are rejected by
    /// it, such as the server's own alarm and device state, so that a flood of client
    /// series cannot stop them from being stored.
    pub series_limit_exempt: Vec<String>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(250),
            checkpoint_interval: Duration::from_secs(300),
            wal_max_bytes: 256 << 20,
            memory_budget_bytes: 512 << 20,
            backpressure_timeout: Duration::from_secs(30),
            partition_duration: Duration::from_secs(86_400),
            compaction_min_segments: 4,
            retention: Duration::from_secs(365 * 86_400),
            rollups: Vec::new(),
            max_series: DEFAULT_MAX_SERIES,
            series_limit_exempt: Vec::new(),
        }
    }
}

/// Segments and frozen memtables, swapped as a whole under one lock.
#[derive(Debug, Default)]
struct State {
    /// Oldest first.
    frozen: Vec<Arc<Frozen>>,
    /// Partition start (ms) to its segments, sorted by `seq_hi`.
    partitions: BTreeMap<i64, Vec<Arc<Segment>>>,
    /// Per rollup tier, partition start (ms) to its rollup segment.
    rollups: Vec<BTreeMap<i64, Arc<Segment>>>,
}

struct Signal {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Signal {
    fn new() -> Self {
        Self {
            flag: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    fn notify(&self) {
        *self
            .flag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        self.cv.notify_all();
    }

    /// Waits until notified or `timeout` passes; returns whether it was notified.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self
            .flag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |flag| !*flag)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *guard, false)
    }
}

struct Inner {
    wal_dir: PathBuf,
    data_dir: PathBuf,
    options: EngineOptions,
    partition_ms: i64,
    catalog: RwLock<Catalog>,
    /// Writers hold it shared; a WAL rotation holds it exclusively, so that every point of
    /// a WAL epoch is in that epoch's memtable.
    gate: RwLock<()>,
    wal: Mutex<WalWriter>,
    epoch: AtomicU64,
    durable_seq: AtomicU64,
    active: Memtable,
    frozen_points: AtomicUsize,
    state: RwLock<State>,
    index_db: Mutex<IndexDb>,
    /// Serialises checkpoints, compaction and retention.
    maintenance: Mutex<()>,
    /// Start of the first raw partition kept. Queries read raw points only from here on.
    retention_floor: AtomicI64,
    /// Writes below it are dropped. It runs ahead of `retention_floor` while a retention
    /// run rolls up the partitions it is about to delete.
    write_floor: AtomicI64,
    tiers: Vec<rollup::Tier>,
    checkpoint_requested: Signal,
    memory_freed: Signal,
    commit_tick: Signal,
    shutdown: AtomicBool,
    metrics: EngineMetrics,
    /// Rate limit of the series-limit WARN line: when it was last logged, and the points
    /// rejected since then.
    series_limit_log: Mutex<(Option<Instant>, u64)>,
    /// Series that count toward `max_series`; changed only under the catalog's write lock.
    limited_series: AtomicUsize,
}

/// The embedded store. Dropping it stops its threads and syncs the WAL.
pub struct Engine {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn is_exempt(options: &EngineOptions, key: &SeriesKey) -> bool {
    options.series_limit_exempt.contains(&key.measurement)
}

fn series_name(key: &SeriesKey) -> String {
    let tags: Vec<String> = key.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{},{} {}", key.measurement, tags.join(","), key.field)
}

impl Engine {
    /// Opens or creates a store in `dir`, replaying the WAL left by a previous process.
    pub fn open(dir: impl AsRef<Path>, options: EngineOptions) -> Result<Engine, StorageError> {
        let dir = dir.as_ref();
        let partition_ms =
            i64::try_from(options.partition_duration.as_millis()).unwrap_or(i64::MAX);
        if partition_ms <= 0 || options.commit_interval.is_zero() {
            return Err(StorageError::InvalidQuery(
                "partition_duration and commit_interval must be positive".to_owned(),
            ));
        }
        let wal_dir = dir.join("wal");
        let data_dir = dir.join("data");
        fs::create_dir_all(&wal_dir)?;
        fs::create_dir_all(&data_dir)?;

        let mut index_db = IndexDb::open(&dir.join("index.sqlite"))?;
        let mut catalog = index_db.load()?;
        let floor = index_db.meta(RETENTION_FLOOR_KEY)?.unwrap_or(i64::MIN);
        let partitions = maintenance::open_partitions(&data_dir, floor)?;
        let (tiers, rollups) = rollup::open_tiers(dir, &options, partition_ms, &index_db)?;
        let max_seq = partitions
            .values()
            .flatten()
            .chain(rollups.iter().flat_map(|tier| tier.values()))
            .map(|s| s.seq_hi)
            .max()
            .unwrap_or(0);

        let active = Memtable::default();
        let (max_wal_epoch, replayed_bytes) = replay_wal(&wal_dir, &mut catalog, &active, floor)?;
        active.set_verified_from(catalog.len() as u32);
        let epoch = max_seq.max(max_wal_epoch) + 1;
        let mut writer = WalWriter::create(&wal_dir, epoch, 0)?;
        // Replayed files are deleted by the first checkpoint, which this size forces.
        writer.bytes_in_epoch = replayed_bytes;

        let limited_series = (0..catalog.len() as u32)
            .filter(|&id| !is_exempt(&options, &catalog.entry(id).0))
            .count();
        let metrics = EngineMetrics::default();
        metrics
            .series
            .set(i64::try_from(catalog.len()).unwrap_or(i64::MAX));
        let segment_count: usize = partitions.values().map(Vec::len).sum();
        tracing::info!(
            dir = %dir.display(),
            series = catalog.len(),
            segments = segment_count,
            replayed_points = active.points(),
            "opened time-series engine"
        );

        let inner = Arc::new(Inner {
            wal_dir,
            data_dir,
            partition_ms,
            catalog: RwLock::new(catalog),
            gate: RwLock::new(()),
            wal: Mutex::new(writer),
            epoch: AtomicU64::new(epoch),
            durable_seq: AtomicU64::new(0),
            active,
            frozen_points: AtomicUsize::new(0),
            state: RwLock::new(State {
                frozen: Vec::new(),
                partitions,
                rollups,
            }),
            index_db: Mutex::new(index_db),
            maintenance: Mutex::new(()),
            retention_floor: AtomicI64::new(floor),
            write_floor: AtomicI64::new(floor),
            tiers,
            checkpoint_requested: Signal::new(),
            memory_freed: Signal::new(),
            commit_tick: Signal::new(),
            shutdown: AtomicBool::new(false),
            metrics,
            series_limit_log: Mutex::new((None, 0)),
            limited_series: AtomicUsize::new(limited_series),
            options,
        });
        inner.update_disk_gauge();
        let threads = vec![
            spawn_committer(Arc::clone(&inner))?,
            spawn_maintainer(Arc::clone(&inner))?,
        ];
        Ok(Engine { inner, threads })
    }

    /// Stores points like [`TimeSeriesStore::write`] and returns the WAL sequence number
    /// of the write, to compare with [`Engine::durable_seq`].
    pub fn write_with_seq(&self, points: Vec<Point>) -> Result<u64, StorageError> {
        self.inner.write(points)
    }

    /// The highest WAL sequence number that is synced to disk.
    pub fn durable_seq(&self) -> u64 {
        self.inner.durable_seq.load(Ordering::SeqCst)
    }

    /// Seals every buffered point into segments now and deletes the WAL files.
    pub fn checkpoint(&self) -> Result<(), StorageError> {
        let _maintenance = lock(&self.inner.maintenance);
        self.inner.checkpoint()
    }

    /// Checkpoints, then merges every partition that has more than one segment.
    pub fn compact_all(&self) -> Result<(), StorageError> {
        let _maintenance = lock(&self.inner.maintenance);
        self.inner.checkpoint()?;
        self.inner.compact(2)
    }

    /// Checkpoints, then computes the rollups of every partition that ends at or before
    /// `until` and whose rollups are missing or stale. The background thread does the same
    /// with the current time after each checkpoint.
    pub fn roll_up(&self, until: Timestamp) -> Result<(), StorageError> {
        let _maintenance = lock(&self.inner.maintenance);
        self.inner.checkpoint()?;
        self.inner.roll_up(until.0)
    }

    /// Bytes of rollup segment files.
    pub fn rollup_bytes(&self) -> u64 {
        self.inner.rollup_bytes()
    }

    /// Bytes of segment files, which is the store's size after a checkpoint.
    pub fn segment_bytes(&self) -> u64 {
        read(&self.inner.state)
            .partitions
            .values()
            .flatten()
            .map(|s| s.file_len)
            .sum()
    }

    /// The newest point of each series that matches `selector`.
    pub fn latest(
        &self,
        selector: &Selector,
    ) -> Result<Vec<(SeriesKey, Timestamp, Value)>, StorageError> {
        self.inner.latest(selector)
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// Registers the engine's metrics, prefixed `storage_engine_`, and the counter
    /// `series_limit_rejected`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.checkpoint_requested.notify();
        self.inner.commit_tick.notify();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Err(err) = self.inner.sync_wal() {
            tracing::error!(error = %err, "failed to sync the WAL on shutdown; the last commit interval may be lost");
        }
    }
}

impl TimeSeriesStore for Engine {
    fn write(&self, points: Vec<Point>) -> Result<(), StorageError> {
        self.inner.write(points).map(|_| ())
    }

    fn query(&self, query: &Query) -> Result<Vec<SeriesData>, StorageError> {
        self.inner.query(query)
    }

    fn latest(
        &self,
        selector: &Selector,
    ) -> Result<Vec<(SeriesKey, Timestamp, Value)>, StorageError> {
        Engine::latest(self, selector)
    }

    fn series(&self, selector: &Selector) -> Result<Vec<SeriesKey>, StorageError> {
        let catalog = read(&self.inner.catalog);
        Ok(catalog
            .select(selector)
            .into_iter()
            .map(|id| catalog.entry(id).0.clone())
            .collect())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.inner.sync_wal()
    }

    fn enforce_retention(&self, cutoff: Timestamp) -> Result<u64, StorageError> {
        let _maintenance = lock(&self.inner.maintenance);
        self.inner.enforce_retention(cutoff.0)
    }

    fn commit_interval(&self) -> Duration {
        self.inner.options.commit_interval
    }
}

/// Replays every WAL file into the memtable. Returns the highest epoch and the bytes read.
fn replay_wal(
    dir: &Path,
    catalog: &mut Catalog,
    active: &Memtable,
    floor: i64,
) -> Result<(u64, u64), StorageError> {
    let mut max_epoch = 0;
    let mut bytes = 0;
    for (epoch, path) in wal::list_wal_files(dir)? {
        max_epoch = max_epoch.max(epoch);
        bytes += fs::metadata(&path)?.len();
        let (records, torn) = wal::read_wal_file(&path)?;
        if torn {
            tracing::warn!(file = %path.display(), "WAL file ends in a torn record; replaying the records before it");
        }
        for record in records {
            match record {
                Record::Series { id, kind, key } => {
                    if (id as usize) >= catalog.len() {
                        catalog.insert(id, key, kind)?;
                    }
                }
                Record::Points(mut points) => {
                    points.retain(|p| p.1 >= floor && (p.0 as usize) < catalog.len());
                    active.insert(&points);
                }
            }
        }
    }
    Ok((max_epoch, bytes))
}

fn spawn_committer(inner: Arc<Inner>) -> Result<JoinHandle<()>, StorageError> {
    let thread = std::thread::Builder::new().name("engine-commit".to_owned()).spawn(move || {
        while !inner.shutdown.load(Ordering::SeqCst) {
            inner.commit_tick.wait(inner.options.commit_interval);
            if let Err(err) = inner.sync_wal() {
                inner.metrics.background_errors.inc();
                tracing::error!(error = %err, "WAL fsync failed; acknowledged writes are not yet durable, retrying");
            }
        }
    })?;
    Ok(thread)
}

fn wall_clock_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

fn spawn_maintainer(inner: Arc<Inner>) -> Result<JoinHandle<()>, StorageError> {
    let thread = std::thread::Builder::new().name("engine-maintain".to_owned()).spawn(move || {
        let mut last_checkpoint = Instant::now();
        while !inner.shutdown.load(Ordering::SeqCst) {
            let requested = inner.checkpoint_requested.wait(Duration::from_secs(1));
            if inner.shutdown.load(Ordering::SeqCst) {
                break;
            }
            let due = last_checkpoint.elapsed() >= inner.options.checkpoint_interval
                || lock(&inner.wal).bytes_in_epoch >= inner.options.wal_max_bytes;
            if !requested && !due {
                continue;
            }
            last_checkpoint = Instant::now();
            let _maintenance = lock(&inner.maintenance);
            let result = inner.checkpoint().and_then(|()| inner.compact(inner.options.compaction_min_segments));
            if let Err(err) = result {
                inner.metrics.background_errors.inc();
                tracing::error!(error = %err, "checkpoint or compaction failed; points stay in the WAL and memory, retrying");
                continue;
            }
            if let Err(err) = inner.roll_up(wall_clock_ms()) {
                inner.metrics.background_errors.inc();
                tracing::error!(error = %err, "rollup failed; raw data is kept and the rollup is retried");
            }
        }
    })?;
    Ok(thread)
}

impl Inner {
    fn buffered_points(&self) -> usize {
        self.active.points() + self.frozen_points.load(Ordering::Relaxed)
    }

    /// Starts a checkpoint at half the memory budget and blocks writers at the full budget.
    fn wait_for_memory(&self) -> Result<(), StorageError> {
        let budget = self.options.memory_budget_bytes / BYTES_PER_POINT;
        if self.active.points() >= budget / 2 {
            self.checkpoint_requested.notify();
        }
        if self.buffered_points() < budget {
            return Ok(());
        }
        self.metrics.backpressure_waits.inc();
        tracing::warn!(
            budget_bytes = self.options.memory_budget_bytes,
            "storage memory budget is full; writes wait for the checkpoint to seal buffered points"
        );
        let deadline = Instant::now() + self.options.backpressure_timeout;
        while self.buffered_points() >= budget {
            let now = Instant::now();
            if now >= deadline {
                return Err(StorageError::Database(format!(
                    "storage memory budget of {} bytes stayed full for {:?}; check disk space and the storage error log",
                    self.options.memory_budget_bytes, self.options.backpressure_timeout
                )));
            }
            self.checkpoint_requested.notify();
            self.memory_freed
                .wait((deadline - now).min(Duration::from_millis(100)));
        }
        Ok(())
    }

    fn write(&self, points: Vec<Point>) -> Result<u64, StorageError> {
        self.wait_for_memory()?;
        let _gate = read(&self.gate);
        let floor = self.write_floor.load(Ordering::SeqCst);
        let total = points.len();
        let points: Vec<Point> = points.into_iter().filter(|p| p.ts.0 >= floor).collect();
        let dropped = total - points.len();
        if dropped > 0 {
            self.metrics.points_dropped_retention.inc_by(dropped as u64);
            tracing::debug!(dropped, "dropped points older than the retention floor");
        }
        if points.is_empty() {
            return Ok(lock(&self.wal).appended_seq);
        }

        let ids = self.resolve_series(&points)?;
        let rows: Vec<(u32, i64, f64)> = points
            .iter()
            .zip(&ids)
            .filter(|(_, id)| **id != REJECTED)
            .map(|(p, &id)| (id, p.ts.0, p.value.as_f64()))
            .collect();
        let seq = if rows.is_empty() {
            lock(&self.wal).appended_seq
        } else {
            let mut bytes = Vec::new();
            wal::encode_points(&mut bytes, &rows);
            let seq = lock(&self.wal).append(&bytes)?;
            self.active.insert(&rows);
            self.metrics.points_written.inc_by(rows.len() as u64);
            seq
        };
        if rows.len() < points.len() {
            return Err(self.series_limit_error(&points, &ids, rows.len()));
        }
        Ok(seq)
    }

    /// Counts and logs the points that `resolve_series` rejected because of
    /// `max_series`, and builds the error returned after the other points were stored.
    fn series_limit_error(&self, points: &[Point], ids: &[u32], stored: usize) -> StorageError {
        let rejected = points.len() - stored;
        self.metrics.series_limit_rejected.inc_by(rejected as u64);
        let first = ids
            .iter()
            .position(|id| *id == REJECTED)
            .map(|i| series_name(&points[i].series))
            .unwrap_or_default();
        let series = self.limited_series.load(Ordering::Relaxed);
        let limit = self.options.max_series;
        let mut log = lock(&self.series_limit_log);
        log.1 += rejected as u64;
        if log
            .0
            .is_none_or(|last| last.elapsed() >= SERIES_LIMIT_LOG_INTERVAL)
        {
            tracing::warn!(
                max_series = limit,
                series,
                rejected_points = log.1,
                first_rejected_series = %first,
                "points rejected because they would create series beyond [storage] max_series; raise max_series or drop a high-cardinality tag"
            );
            *log = (Some(Instant::now()), 0);
        }
        StorageError::SeriesLimit {
            limit,
            series,
            rejected,
            stored,
            first,
        }
    }

    /// Maps each point to its series id, creating missing series. Fails before changing
    /// anything when a value's kind differs from its series' kind. Points whose new series
    /// would exceed `max_series` get the id [`REJECTED`], and their series are not created.
    fn resolve_series(&self, points: &[Point]) -> Result<Vec<u32>, StorageError> {
        let mut ids = vec![REJECTED; points.len()];
        let mut missing = Vec::new();
        {
            let catalog = read(&self.catalog);
            for (i, p) in points.iter().enumerate() {
                match catalog.id(&p.series) {
                    Some(id) => {
                        check_kind(&p.series, catalog.entry(id).1, p.value)?;
                        ids[i] = id;
                    }
                    None => missing.push(i),
                }
            }
        }
        if missing.is_empty() {
            return Ok(ids);
        }

        // New series are declared in the WAL before other writers can see their ids.
        let mut wal = lock(&self.wal);
        let mut catalog = write(&self.catalog);
        let mut new_series: Vec<(SeriesKey, ValueKind)> = Vec::new();
        // A batch can declare thousands of series, so repeats within it are found by hash.
        let mut new_kinds: HashMap<&SeriesKey, ValueKind, foldhash::fast::RandomState> =
            HashMap::default();
        for &i in &missing {
            let p = &points[i];
            let stored = catalog
                .id(&p.series)
                .map(|id| catalog.entry(id).1)
                .or_else(|| new_kinds.get(&p.series).copied());
            match stored {
                Some(kind) => check_kind(&p.series, kind, p.value)?,
                None => {
                    new_kinds.insert(&p.series, p.value.kind());
                    new_series.push((p.series.clone(), p.value.kind()));
                }
            }
        }
        let limited = self.limited_series.load(Ordering::Relaxed);
        let mut room = match self.options.max_series {
            0 => usize::MAX,
            max => max.saturating_sub(limited),
        };
        let mut added_limited = 0;
        new_series.retain(|(key, _)| {
            if is_exempt(&self.options, key) {
                return true;
            }
            let fits = room > 0;
            if fits {
                room -= 1;
                added_limited += 1;
            }
            fits
        });
        if !new_series.is_empty() {
            let mut bytes = Vec::new();
            let first_id = catalog.len() as u32;
            for (n, (key, kind)) in new_series.iter().enumerate() {
                wal::encode_series(&mut bytes, first_id + n as u32, *kind, key);
            }
            wal.append(&bytes)?;
            for (n, (key, kind)) in new_series.into_iter().enumerate() {
                catalog.insert(first_id + n as u32, key, kind)?;
            }
            self.metrics
                .series
                .set(i64::try_from(catalog.len()).unwrap_or(i64::MAX));
            self.limited_series
                .store(limited + added_limited, Ordering::Relaxed);
        }
        for &i in &missing {
            ids[i] = catalog.id(&points[i].series).unwrap_or(REJECTED);
        }
        Ok(ids)
    }

    /// Syncs the WAL and advances the durable watermark.
    fn sync_wal(&self) -> Result<(), StorageError> {
        let (file, seq) = {
            let wal = lock(&self.wal);
            (wal.file.try_clone()?, wal.appended_seq)
        };
        if seq <= self.durable_seq.load(Ordering::SeqCst) {
            return Ok(());
        }
        // A rotation may swap files meanwhile; the old file still holds records up to `seq`.
        file.sync_data()?;
        self.durable_seq.fetch_max(seq, Ordering::SeqCst);
        self.metrics.wal_syncs.inc();
        Ok(())
    }

    fn query(&self, query: &Query) -> Result<Vec<SeriesData>, StorageError> {
        let step_ms = match query.aggregation {
            Some((step, _)) => {
                let ms = i64::try_from(step.as_millis()).unwrap_or(i64::MAX);
                if ms == 0 {
                    return Err(StorageError::InvalidQuery(format!(
                        "step {step:?} is shorter than 1 ms; use a step of at least 1 ms"
                    )));
                }
                Some(ms)
            }
            None => None,
        };
        let floor = self.retention_floor.load(Ordering::SeqCst);
        let from = query.from.0.max(floor);
        let to = query.to.0;
        // Aggregations read rollups for the part of the range whose raw data is deleted.
        let rollup_plan = match step_ms {
            Some(step_ms) => self.plan_rollups(query.from.0, to.min(floor), step_ms),
            None => Vec::new(),
        };
        let raw_range = from < to;
        if !raw_range && rollup_plan.is_empty() {
            return Ok(Vec::new());
        }
        let selected: Vec<(u32, SeriesKey, ValueKind)> = {
            let catalog = read(&self.catalog);
            catalog
                .select(&query.selector)
                .into_iter()
                .map(|id| {
                    let (key, kind) = catalog.entry(id);
                    (id, key.clone(), *kind)
                })
                .collect()
        };
        let (segments, frozen, actives) = if raw_range {
            self.snapshot(&selected, from, to)
        } else {
            (
                Vec::new(),
                Vec::new(),
                vec![SeriesBuf::default(); selected.len()],
            )
        };

        let mut out = Vec::new();
        for ((id, key, kind), active) in selected.into_iter().zip(actives) {
            let mut sources = Vec::new();
            for segment in &segments {
                if let Some(meta) = segment.chunk(id)
                    && meta.max_ts >= from
                    && meta.min_ts < to
                {
                    let chunk = segment.read_chunk(meta)?;
                    sources.push(memtable::filter_range(&chunk, from, to));
                }
            }
            sources.extend(frozen.iter().map(|f| f.copy_range(id, from, to)));
            sources.push(active);
            let merged = merge::merge(sources);
            let mut points: Vec<(Timestamp, Value)> = match (step_ms, query.aggregation) {
                (Some(step_ms), Some((_, aggregate))) => {
                    let steps = self.summarize_steps(id, &rollup_plan, &merged, step_ms)?;
                    steps
                        .into_iter()
                        .map(|(start, summary)| (Timestamp(start), summary.value(aggregate, kind)))
                        .collect()
                }
                _ => merged
                    .ts
                    .iter()
                    .zip(&merged.values)
                    .map(|(&ts, &v)| (Timestamp(ts), Value::from_stored(v, kind)))
                    .collect(),
            };
            if points.is_empty() {
                continue;
            }
            if let Some(limit) = query.limit {
                points.truncate(limit);
            }
            out.push(SeriesData {
                series: key,
                kind,
                points,
            });
        }
        Ok(out)
    }

    /// Summarizes one series per step: rollup rows for the planned ranges below the
    /// retention floor, then raw points. A step that spans the floor combines both.
    fn summarize_steps(
        &self,
        id: u32,
        rollup_plan: &[(usize, i64, i64)],
        raw: &SeriesBuf,
        step_ms: i64,
    ) -> Result<Vec<(i64, merge::Summary)>, StorageError> {
        let mut rows = Vec::new();
        for &(tier, from, to) in rollup_plan {
            rows.extend(self.read_rollups(tier, id, from, to)?);
        }
        let mut steps = merge::combine(rows, step_ms);
        let mut raw_steps = merge::summarize(raw, step_ms).into_iter();
        if let (Some(last), Some(first_raw)) = (steps.last_mut(), raw_steps.as_slice().first())
            && last.0 == first_raw.0
        {
            last.1.append(&first_raw.1);
            raw_steps.next();
        }
        steps.extend(raw_steps);
        Ok(steps)
    }

    /// Takes a consistent view of segments, frozen memtables and the active memtable. A
    /// rotation between the two reads would hide points, so the view is retaken then.
    fn snapshot(
        &self,
        selected: &[(u32, SeriesKey, ValueKind)],
        from: i64,
        to: i64,
    ) -> (Vec<Arc<Segment>>, Vec<Arc<Frozen>>, Vec<SeriesBuf>) {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let (segments, frozen) = {
                let state = read(&self.state);
                let first_partition = merge::step_start(from, self.partition_ms);
                let segments: Vec<Arc<Segment>> = state
                    .partitions
                    .range(first_partition..to)
                    .flat_map(|(_, segs)| segs.iter().cloned())
                    .collect();
                (segments, state.frozen.clone())
            };
            let actives = selected
                .iter()
                .map(|(id, _, _)| self.active.copy_range(*id, from, to))
                .collect();
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return (segments, frozen, actives);
            }
        }
    }

    fn latest(
        &self,
        selector: &Selector,
    ) -> Result<Vec<(SeriesKey, Timestamp, Value)>, StorageError> {
        let selected: Vec<(u32, SeriesKey, ValueKind)> = {
            let catalog = read(&self.catalog);
            catalog
                .select(selector)
                .into_iter()
                .map(|id| {
                    let (key, kind) = catalog.entry(id);
                    (id, key.clone(), *kind)
                })
                .collect()
        };
        let floor = self.retention_floor.load(Ordering::SeqCst);
        let mut out = Vec::with_capacity(selected.len());
        for (id, key, kind) in selected {
            let latest = match self.active.latest(id) {
                Some((ts, value, true)) => Some((ts, value)),
                _ => self.latest_from_storage(id, floor)?,
            };
            if let Some((ts, value)) = latest.filter(|(ts, _)| *ts >= floor) {
                out.push((key, Timestamp(ts), Value::from_stored(value, kind)));
            }
        }
        Ok(out)
    }

    /// Finds the newest point of a series in segments and frozen memtables and caches it.
    fn latest_from_storage(&self, id: u32, floor: i64) -> Result<Option<(i64, f64)>, StorageError> {
        let (newest, frozen) = {
            let state = read(&self.state);
            let newest: Vec<Arc<Segment>> = state
                .partitions
                .values()
                .rev()
                .find(|segs| segs.iter().any(|s| s.chunk(id).is_some()))
                .cloned()
                .unwrap_or_default();
            (newest, state.frozen.clone())
        };
        let mut sources = Vec::new();
        for segment in &newest {
            if let Some(meta) = segment.chunk(id) {
                sources.push(segment.read_chunk(meta)?);
            }
        }
        sources.extend(frozen.iter().map(|f| f.copy_range(id, floor, i64::MAX)));
        let merged = merge::merge(sources);
        if let (Some(&ts), Some(&value)) = (merged.ts.last(), merged.values.last()) {
            self.active.offer_latest(id, ts, value);
        }
        Ok(self.active.latest(id).map(|(ts, value, _)| (ts, value)))
    }
}

fn check_kind(series: &SeriesKey, stored: ValueKind, value: Value) -> Result<(), StorageError> {
    if stored == value.kind() {
        return Ok(());
    }
    Err(StorageError::KindMismatch {
        series: series_name(series),
        stored,
        offered: value.kind(),
    })
}
