//! Checkpoints, compaction and retention. Each runs with `Inner::maintenance` held, so
//! they never overlap, and swaps its result into the shared state under a short lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::storage::StorageError;

use super::memtable::{Frozen, SeriesBuf};
use super::segment::{self, Segment};
use super::{Inner, RETENTION_FLOOR_KEY, lock, merge, read, wal, write};

fn partition_dir(data_dir: &Path, start: i64) -> PathBuf {
    data_dir.join(format!("p-{start}"))
}

/// Parses a partition directory name `p-{start_ms}`.
pub(super) fn parse_partition_name(name: &std::ffi::OsStr) -> Option<i64> {
    name.to_str()
        .and_then(|n| n.strip_prefix("p-"))
        .and_then(|n| n.parse::<i64>().ok())
}

/// Opens every segment under `data_dir`. Leftover `.tmp` files, segments covered by a
/// compacted segment (a compaction that crashed before its cleanup) and partitions below
/// the retention floor (a retention run that crashed before its cleanup) are deleted.
pub(super) fn open_partitions(
    data_dir: &Path,
    floor: i64,
) -> Result<BTreeMap<i64, Vec<Arc<Segment>>>, StorageError> {
    let mut partitions = BTreeMap::new();
    for entry in fs::read_dir(data_dir)? {
        let entry = entry?;
        let Some(start) = parse_partition_name(&entry.file_name()) else {
            continue;
        };
        if start < floor {
            tracing::info!(dir = %entry.path().display(), "deleting a partition below the retention floor");
            fs::remove_dir_all(entry.path())?;
            continue;
        }
        let segments = open_partition(&entry.path())?;
        if !segments.is_empty() {
            partitions.insert(start, segments);
        }
    }
    Ok(partitions)
}

fn open_partition(dir: &Path) -> Result<Vec<Arc<Segment>>, StorageError> {
    let mut ranges = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            fs::remove_file(entry.path())?;
        } else if let Some(range) = segment::parse_segment_file_name(&name) {
            ranges.push((range, entry.path()));
        }
    }
    let covered = |(lo, hi): (u64, u64)| {
        ranges
            .iter()
            .any(|&((l, h), _)| (l, h) != (lo, hi) && l <= lo && hi <= h)
    };
    let mut segments = Vec::new();
    for &((lo, hi), ref path) in &ranges {
        if covered((lo, hi)) {
            tracing::info!(file = %path.display(), "deleting a segment already merged by compaction");
            fs::remove_file(path)?;
            continue;
        }
        segments.push(Arc::new(Segment::open(path, lo, hi)?));
    }
    segments.sort_by_key(|s| s.seq_hi);
    Ok(segments)
}

/// Splits a sorted series into runs by partition start.
fn split_by_partition(buf: SeriesBuf, partition_ms: i64) -> Vec<(i64, SeriesBuf)> {
    let mut out: Vec<(i64, SeriesBuf)> = Vec::new();
    for (ts, value) in buf.ts.into_iter().zip(buf.values) {
        let start = merge::step_start(ts, partition_ms);
        if out.last().is_none_or(|(s, _)| *s != start) {
            out.push((start, SeriesBuf::default()));
        }
        let (_, run) = out.last_mut().expect("run was just pushed");
        run.ts.push(ts);
        run.values.push(value);
    }
    out
}

impl Inner {
    /// Freezes the active memtable, starts a new WAL epoch, and seals every frozen memtable.
    pub(super) fn checkpoint(&self) -> Result<(), StorageError> {
        self.rotate()?;
        let frozen = read(&self.state).frozen.clone();
        for f in frozen {
            self.seal(&f)?;
        }
        Ok(())
    }

    fn rotate(&self) -> Result<(), StorageError> {
        let _gate = write(&self.gate);
        let mut wal = lock(&self.wal);
        if self.active.points() == 0 && wal.bytes_in_epoch == 0 {
            return Ok(());
        }
        wal.file.sync_data()?;
        self.durable_seq
            .fetch_max(wal.appended_seq, Ordering::SeqCst);
        let old_epoch = wal.epoch;
        *wal = wal::WalWriter::create(&self.wal_dir, old_epoch + 1, wal.appended_seq)?;
        self.epoch.store(old_epoch + 1, Ordering::SeqCst);
        let frozen = self.active.take(old_epoch);
        self.frozen_points
            .fetch_add(frozen.points, Ordering::Relaxed);
        write(&self.state).frozen.push(Arc::new(frozen));
        Ok(())
    }

    /// Writes one segment per partition from a frozen memtable, persists new series, and
    /// then deletes the WAL files that the frozen memtable covers.
    fn seal(&self, frozen: &Arc<Frozen>) -> Result<(), StorageError> {
        let floor = self.retention_floor.load(Ordering::SeqCst);
        let mut by_partition: BTreeMap<i64, Vec<(u32, SeriesBuf)>> = BTreeMap::new();
        for shard in &frozen.shards {
            for (&id, buf) in shard {
                let sorted =
                    merge::merge(vec![super::memtable::filter_range(buf, floor, i64::MAX)]);
                for (start, run) in split_by_partition(sorted, self.partition_ms) {
                    by_partition.entry(start).or_default().push((id, run));
                }
            }
        }
        let mut sealed = Vec::new();
        for (start, mut chunks) in by_partition {
            chunks.sort_by_key(|(id, _)| *id);
            let dir = partition_dir(&self.data_dir, start);
            let segment = segment::write_segment(
                &dir,
                frozen.epoch,
                frozen.epoch,
                chunks.into_iter().map(Ok),
            )?;
            sealed.push((start, Arc::new(segment)));
        }
        self.persist_catalog()?;

        {
            let mut state = write(&self.state);
            for (start, segment) in sealed {
                let segments = state.partitions.entry(start).or_default();
                segments.push(segment);
                segments.sort_by_key(|s| s.seq_hi);
            }
            state.frozen.retain(|f| !Arc::ptr_eq(f, frozen));
        }
        self.frozen_points
            .fetch_sub(frozen.points, Ordering::Relaxed);
        self.memory_freed.notify();
        self.metrics.checkpoints.inc();
        self.update_disk_gauge();

        for (epoch, path) in wal::list_wal_files(&self.wal_dir)? {
            if epoch <= frozen.epoch {
                fs::remove_file(path)?;
            }
        }
        segment::sync_dir(&self.wal_dir)?;
        tracing::debug!(
            epoch = frozen.epoch,
            points = frozen.points,
            "sealed memtable into segments"
        );
        Ok(())
    }

    fn persist_catalog(&self) -> Result<(), StorageError> {
        let mut db = lock(&self.index_db);
        let entries = read(&self.catalog).entries_from(db.persisted());
        db.persist(&entries)
    }

    /// Merges the segments of every partition that has at least `min_segments`.
    pub(super) fn compact(&self, min_segments: usize) -> Result<(), StorageError> {
        let candidates: Vec<(i64, Vec<Arc<Segment>>)> = read(&self.state)
            .partitions
            .iter()
            .filter(|(_, segs)| segs.len() >= min_segments.max(2))
            .map(|(start, segs)| (*start, segs.clone()))
            .collect();
        for (start, segments) in candidates {
            self.compact_partition(start, &segments)?;
        }
        Ok(())
    }

    fn compact_partition(&self, start: i64, segments: &[Arc<Segment>]) -> Result<(), StorageError> {
        let seq_lo = segments.iter().map(|s| s.seq_lo).min().unwrap_or(0);
        let seq_hi = segments.iter().map(|s| s.seq_hi).max().unwrap_or(0);
        let ids: BTreeSet<u32> = segments
            .iter()
            .flat_map(|s| s.chunks().iter().map(|c| c.series))
            .collect();
        let floor = self.retention_floor.load(Ordering::SeqCst);
        let chunks = ids.into_iter().map(|id| {
            let mut sources = Vec::new();
            for segment in segments {
                if let Some(meta) = segment.chunk(id) {
                    sources.push(segment.read_chunk(meta)?);
                }
            }
            let merged = merge::merge(sources);
            Ok((id, super::memtable::filter_range(&merged, floor, i64::MAX)))
        });
        let dir = partition_dir(&self.data_dir, start);
        let merged = Arc::new(segment::write_segment(&dir, seq_lo, seq_hi, chunks)?);

        {
            let mut state = write(&self.state);
            let current = state.partitions.entry(start).or_default();
            current.retain(|s| !segments.iter().any(|old| Arc::ptr_eq(s, old)));
            current.push(merged);
            current.sort_by_key(|s| s.seq_hi);
        }
        for old in segments {
            fs::remove_file(&old.path)?;
        }
        segment::sync_dir(&dir)?;
        self.metrics.compactions.inc();
        self.update_disk_gauge();
        tracing::debug!(
            partition = start,
            segments = segments.len(),
            "compacted partition"
        );
        Ok(())
    }

    /// Deletes every partition that ends at or before `cutoff` and every buffered point
    /// older than the first partition kept, after rolling them up, and then deletes
    /// rollups past their own retention.
    pub(super) fn enforce_retention(&self, cutoff: i64) -> Result<u64, StorageError> {
        let floor = merge::step_start(cutoff, self.partition_ms);
        let mut deleted = 0;
        if floor > self.retention_floor.load(Ordering::SeqCst) {
            deleted += self.expire_raw(floor)?;
        }
        deleted += self.enforce_rollup_retention(cutoff)?;
        Ok(deleted)
    }

    fn expire_raw(&self, floor: i64) -> Result<u64, StorageError> {
        if !self.tiers.is_empty() {
            // From here on writes below the new floor are dropped. The checkpoint then
            // seals every point accepted before, so the rollups include all of them.
            let previous = self.write_floor.fetch_max(floor, Ordering::SeqCst);
            let rolled_up = self.checkpoint().and_then(|()| self.roll_up(floor));
            if let Err(err) = rolled_up {
                self.write_floor.store(previous, Ordering::SeqCst);
                return Err(err);
            }
        }
        // The floor is persisted before the partitions are deleted, so a WAL replay after
        // a crash cannot bring back points of partitions deleted below.
        lock(&self.index_db).set_meta(RETENTION_FLOOR_KEY, floor)?;
        self.retention_floor.store(floor, Ordering::SeqCst);
        self.write_floor.fetch_max(floor, Ordering::SeqCst);

        let removed: Vec<(i64, Vec<Arc<Segment>>)> = {
            let mut state = write(&self.state);
            let kept = state.partitions.split_off(&floor);
            std::mem::replace(&mut state.partitions, kept)
                .into_iter()
                .collect()
        };
        let mut deleted = self.active.drop_before(floor) as u64;
        for (start, segments) in removed {
            deleted += segments.iter().map(|s| s.point_count()).sum::<u64>();
            fs::remove_dir_all(partition_dir(&self.data_dir, start))?;
        }
        segment::sync_dir(&self.data_dir)?;
        self.update_disk_gauge();
        tracing::info!(
            floor_ms = floor,
            deleted,
            "retention deleted old partitions"
        );
        Ok(deleted)
    }

    pub(super) fn update_disk_gauge(&self) {
        let bytes: u64 = read(&self.state)
            .partitions
            .values()
            .flatten()
            .map(|s| s.file_len)
            .sum();
        self.metrics
            .segment_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metrics
            .rollup_bytes
            .set(i64::try_from(self.rollup_bytes()).unwrap_or(i64::MAX));
    }
}
