//! Downsampling: per-series summaries (count, sum, min, max, first, last) of fixed-width
//! buckets, computed from sealed raw partitions and kept longer than raw data.
//!
//! Each tier stores one rollup segment per raw partition in
//! `rollups/r-{resolution_ms}/p-{start}/`. The segment is named after the WAL epoch range
//! of the raw segments it summarizes, so a rollup is current exactly when its last epoch
//! equals the newest raw segment's. A stale rollup is recomputed from the whole raw
//! partition, written to `.tmp`, renamed, and only then is the older file deleted, so a
//! crash leaves either the old or the new complete file and never counts a point twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde::Deserialize;

use crate::storage::StorageError;

use super::catalog::IndexDb;
use super::merge::{self, Summary};
use super::segment::{self, RollupBuf, Segment};
use super::{Inner, lock, read, write};

/// One downsampling tier: summaries per `resolution`, kept for `retention`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupTier {
    /// Bucket width, such as `"1m"`. It must divide the partition width and be a multiple
    /// of the previous tier's resolution.
    #[serde(with = "humantime_serde")]
    pub resolution: Duration,
    /// How long rollups are kept, at least as long as raw data.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

/// Partition start (ms) to the rollup segment of one tier.
pub(super) type TierPartitions = BTreeMap<i64, Arc<Segment>>;

/// A configured tier with its directory and retention floor.
#[derive(Debug)]
pub(super) struct Tier {
    pub resolution_ms: i64,
    pub retention_ms: i64,
    pub dir: PathBuf,
    /// Start of the first rollup partition kept; queries read no rollups below it.
    pub floor: AtomicI64,
}

impl Tier {
    fn floor_key(&self) -> String {
        format!("rollup_floor_ms_{}", self.resolution_ms)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Checks the tiers against the partition width and the raw retention, and opens their
/// floors and rollup segments.
pub(super) fn open_tiers(
    root: &Path,
    options: &super::EngineOptions,
    partition_ms: i64,
    index_db: &IndexDb,
) -> Result<(Vec<Tier>, Vec<TierPartitions>), StorageError> {
    let invalid =
        |message: String| StorageError::InvalidQuery(format!("invalid rollup tier: {message}"));
    let mut tiers = Vec::new();
    let mut segments = Vec::new();
    let mut previous: Option<i64> = None;
    for tier in &options.rollups {
        let resolution_ms = millis(tier.resolution);
        if resolution_ms <= 0 || partition_ms % resolution_ms != 0 {
            return Err(invalid(format!(
                "resolution {:?} must be at least 1 ms and divide the partition width of {partition_ms} ms",
                tier.resolution
            )));
        }
        if let Some(previous) = previous
            && (resolution_ms <= previous || resolution_ms % previous != 0)
        {
            return Err(invalid(format!(
                "resolution {:?} must be a larger multiple of the previous tier's {previous} ms",
                tier.resolution
            )));
        }
        if tier.retention < options.retention {
            return Err(invalid(format!(
                "retention {:?} is shorter than the raw retention {:?}",
                tier.retention, options.retention
            )));
        }
        previous = Some(resolution_ms);
        let dir = root.join("rollups").join(format!("r-{resolution_ms}"));
        fs::create_dir_all(&dir)?;
        let tier = Tier {
            resolution_ms,
            retention_ms: millis(tier.retention),
            dir,
            floor: AtomicI64::new(i64::MIN),
        };
        let floor = index_db.meta(&tier.floor_key())?.unwrap_or(i64::MIN);
        tier.floor.store(floor, Ordering::SeqCst);
        segments.push(open_tier(&tier.dir, floor)?);
        tiers.push(tier);
    }
    Ok((tiers, segments))
}

/// Opens the rollup partitions of one tier. In each partition only the rollup with the
/// newest epoch range is kept: older ones are left over from a crash between writing a
/// recomputed rollup and deleting the one it replaced. Leftover `.tmp` files, partitions
/// left empty by them, and partitions below the floor are deleted.
fn open_tier(dir: &Path, floor: i64) -> Result<TierPartitions, StorageError> {
    let mut partitions = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(start) = super::maintenance::parse_partition_name(&entry.file_name()) else {
            continue;
        };
        if start < floor {
            fs::remove_dir_all(entry.path())?;
            continue;
        }
        let mut files = Vec::new();
        for file in fs::read_dir(entry.path())? {
            let file = file?;
            let name = file.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                fs::remove_file(file.path())?;
            } else if let Some(range) = segment::parse_segment_file_name(&name) {
                files.push((range, file.path()));
            }
        }
        files.sort_by_key(|((_, hi), _)| *hi);
        let Some(((lo, hi), newest)) = files.pop() else {
            // A crash before the first rollup of this partition was renamed.
            fs::remove_dir(entry.path())?;
            continue;
        };
        for (_, older) in files {
            tracing::info!(file = %older.display(), "deleting a rollup replaced by a newer one");
            fs::remove_file(older)?;
        }
        let segment = Segment::open(&newest, lo, hi)?;
        if !segment.rollup {
            return Err(StorageError::Database(format!(
                "{} is in a rollup directory but contains raw points; move it away to open the store",
                newest.display()
            )));
        }
        partitions.insert(start, Arc::new(segment));
    }
    Ok(partitions)
}

fn round_up(ts: i64, step_ms: i64) -> i64 {
    let start = merge::step_start(ts, step_ms);
    if start == ts {
        ts
    } else {
        start.saturating_add(step_ms)
    }
}

impl Inner {
    /// Computes the rollups of every raw partition that ends at or before `until` and
    /// whose rollups are missing or older than its newest segment.
    pub(super) fn roll_up(&self, until: i64) -> Result<(), StorageError> {
        if self.tiers.is_empty() {
            return Ok(());
        }
        let stale: Vec<(i64, Vec<Arc<Segment>>)> = {
            let state = read(&self.state);
            state
                .partitions
                .iter()
                .filter(|(start, _)| start.saturating_add(self.partition_ms) <= until)
                .filter(|(start, segments)| {
                    let seq_hi = segments.iter().map(|s| s.seq_hi).max().unwrap_or(0);
                    state
                        .rollups
                        .iter()
                        .any(|tier| tier.get(start).is_none_or(|r| r.seq_hi != seq_hi))
                })
                .map(|(start, segments)| (*start, segments.clone()))
                .collect()
        };
        for (start, segments) in stale {
            self.roll_up_partition(start, &segments)?;
        }
        Ok(())
    }

    /// Writes the rollups of one raw partition for every tier whose rollup is stale, and
    /// then deletes the rollups they replace.
    fn roll_up_partition(&self, start: i64, segments: &[Arc<Segment>]) -> Result<(), StorageError> {
        let seq_lo = segments.iter().map(|s| s.seq_lo).min().unwrap_or(0);
        let seq_hi = segments.iter().map(|s| s.seq_hi).max().unwrap_or(0);
        let ids: BTreeSet<u32> = segments
            .iter()
            .flat_map(|s| s.chunks().iter().map(|c| c.series))
            .collect();
        for (t, tier) in self.tiers.iter().enumerate() {
            let current = read(&self.state).rollups[t].get(&start).map(|r| r.seq_hi);
            if current == Some(seq_hi) {
                continue;
            }
            // One series at a time, so memory stays at one series' raw chunk.
            let chunks = ids.iter().map(|&id| {
                let mut sources = Vec::new();
                for segment in segments {
                    if let Some(meta) = segment.chunk(id) {
                        sources.push(segment.read_chunk(meta)?);
                    }
                }
                let rows = merge::summarize(&merge::merge(sources), tier.resolution_ms);
                let (ts, rows) = rows.into_iter().unzip();
                Ok((id, RollupBuf { ts, rows }))
            });
            let dir = tier.dir.join(format!("p-{start}"));
            let rollup = Arc::new(segment::write_rollup_segment(&dir, seq_lo, seq_hi, chunks)?);
            let replaced = write(&self.state).rollups[t].insert(start, Arc::clone(&rollup));
            if let Some(old) = replaced
                && old.path != rollup.path
            {
                fs::remove_file(&old.path)?;
                segment::sync_dir(&dir)?;
            }
            self.metrics.rollups.inc();
            tracing::debug!(
                partition = start,
                resolution_ms = tier.resolution_ms,
                seq_hi,
                "rolled up partition"
            );
        }
        self.update_disk_gauge();
        Ok(())
    }

    /// Deletes the rollup partitions of each tier that end at or before the tier's
    /// cutoff, which is `cutoff` moved back by the tier's retention beyond raw retention.
    /// Returns the number of rollup rows deleted.
    pub(super) fn enforce_rollup_retention(&self, cutoff: i64) -> Result<u64, StorageError> {
        let raw_retention_ms = millis(self.options.retention);
        let mut deleted = 0;
        for (t, tier) in self.tiers.iter().enumerate() {
            let tier_cutoff =
                cutoff.saturating_sub(tier.retention_ms.saturating_sub(raw_retention_ms));
            let floor = merge::step_start(tier_cutoff, self.partition_ms);
            if floor <= tier.floor.load(Ordering::SeqCst) {
                continue;
            }
            lock(&self.index_db).set_meta(&tier.floor_key(), floor)?;
            tier.floor.store(floor, Ordering::SeqCst);
            let removed = {
                let mut state = write(&self.state);
                let kept = state.rollups[t].split_off(&floor);
                std::mem::replace(&mut state.rollups[t], kept)
            };
            for (start, rollup) in removed {
                deleted += rollup.point_count();
                fs::remove_dir_all(tier.dir.join(format!("p-{start}")))?;
            }
            segment::sync_dir(&tier.dir)?;
            tracing::info!(
                resolution_ms = tier.resolution_ms,
                floor_ms = floor,
                "retention deleted old rollups"
            );
        }
        self.update_disk_gauge();
        Ok(deleted)
    }

    /// Plans which tier serves which part of `[from, to)` for an aggregation with
    /// `step_ms`: the finest tier whose resolution divides the step first, then coarser
    /// tiers for older data. Ranges are rounded inward to whole buckets, because a bucket
    /// that is only partly inside the range cannot be split. Returns (tier, from, to),
    /// oldest first.
    pub(super) fn plan_rollups(&self, from: i64, to: i64, step_ms: i64) -> Vec<(usize, i64, i64)> {
        let mut plan = Vec::new();
        let mut upper = to;
        for (t, tier) in self.tiers.iter().enumerate() {
            if step_ms % tier.resolution_ms != 0 {
                continue;
            }
            let lo = round_up(
                from.max(tier.floor.load(Ordering::SeqCst)),
                tier.resolution_ms,
            );
            let hi = merge::step_start(upper, tier.resolution_ms);
            if lo < hi {
                plan.push((t, lo, hi));
                upper = lo;
            }
        }
        plan.reverse();
        plan
    }

    /// Reads the rollup rows of one series from one tier with `from <= bucket < to`.
    pub(super) fn read_rollups(
        &self,
        tier: usize,
        id: u32,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, Summary)>, StorageError> {
        let first_partition = merge::step_start(from, self.partition_ms);
        let rollups: Vec<Arc<Segment>> = read(&self.state).rollups[tier]
            .range(first_partition..to)
            .map(|(_, r)| Arc::clone(r))
            .collect();
        let mut rows = Vec::new();
        for rollup in rollups {
            let Some(meta) = rollup.chunk(id) else {
                continue;
            };
            if meta.max_ts < from || meta.min_ts >= to {
                continue;
            }
            let chunk = rollup.read_rollup_chunk(meta)?;
            rows.extend(
                chunk
                    .ts
                    .into_iter()
                    .zip(chunk.rows)
                    .filter(|(ts, _)| *ts >= from && *ts < to),
            );
        }
        Ok(rows)
    }

    pub(super) fn rollup_bytes(&self) -> u64 {
        read(&self.state)
            .rollups
            .iter()
            .flat_map(|tier| tier.values())
            .map(|r| r.file_len)
            .sum()
    }
}
