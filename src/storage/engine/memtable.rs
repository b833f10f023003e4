//! Unsealed points in memory, sharded by series id so writers rarely wait on each other.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

const SHARDS: usize = 32;

/// Points of one series in arrival order: not sorted, and may repeat a timestamp.
#[derive(Debug, Default, Clone)]
pub struct SeriesBuf {
    pub ts: Vec<i64>,
    pub values: Vec<f64>,
}

pub type Shard = HashMap<u32, SeriesBuf, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct ShardData {
    points: Shard,
    /// Newest point per series and whether it is verified against segments. It outlives
    /// checkpoints, so the latest value of every series is known without reading segments.
    latest: HashMap<u32, (i64, f64, bool), foldhash::fast::RandomState>,
}

/// The memtable that receives writes of the current epoch.
#[derive(Debug)]
pub struct Memtable {
    shards: Vec<Mutex<ShardData>>,
    points: AtomicUsize,
    /// Series with ids from here on were created by this process, so no segment holds a
    /// point that this process did not see and their cached latest point is verified.
    verified_from: AtomicU32,
}

/// A memtable of a finished epoch, waiting to be sealed into segments.
#[derive(Debug)]
pub struct Frozen {
    pub epoch: u64,
    pub shards: Vec<Shard>,
    pub points: usize,
}

fn lock(shard: &Mutex<ShardData>) -> std::sync::MutexGuard<'_, ShardData> {
    shard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Default for Memtable {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            points: AtomicUsize::new(0),
            verified_from: AtomicU32::new(u32::MAX),
        }
    }
}

impl Memtable {
    pub fn points(&self) -> usize {
        self.points.load(Ordering::Relaxed)
    }

    pub fn set_verified_from(&self, id: u32) {
        self.verified_from.store(id, Ordering::Relaxed);
    }

    /// Inserts points, locking each shard once.
    pub fn insert(&self, points: &[(u32, i64, f64)]) {
        let mut by_shard: Vec<Vec<&(u32, i64, f64)>> = vec![Vec::new(); SHARDS];
        for p in points {
            by_shard[p.0 as usize % SHARDS].push(p);
        }
        let verified_from = self.verified_from.load(Ordering::Relaxed);
        for (i, group) in by_shard.iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let mut shard = lock(&self.shards[i]);
            for &&(id, ts, value) in group {
                let buf = shard.points.entry(id).or_default();
                buf.ts.push(ts);
                buf.values.push(value);
                let latest = shard
                    .latest
                    .entry(id)
                    .or_insert((ts, value, id >= verified_from));
                if ts >= latest.0 {
                    (latest.0, latest.1) = (ts, value);
                }
            }
        }
        self.points.fetch_add(points.len(), Ordering::Relaxed);
    }

    /// Takes every point out, leaving the memtable empty.
    pub fn take(&self, epoch: u64) -> Frozen {
        let shards: Vec<Shard> = self
            .shards
            .iter()
            .map(|s| std::mem::take(&mut lock(s).points))
            .collect();
        let points = self.points.swap(0, Ordering::Relaxed);
        Frozen {
            epoch,
            shards,
            points,
        }
    }

    /// Copies the points of one series with `from <= ts < to`, in arrival order.
    pub fn copy_range(&self, id: u32, from: i64, to: i64) -> SeriesBuf {
        let shard = lock(&self.shards[id as usize % SHARDS]);
        shard
            .points
            .get(&id)
            .map(|buf| filter_range(buf, from, to))
            .unwrap_or_default()
    }

    /// The newest point of a series written or looked up since the store opened, and
    /// whether it is verified against segments.
    pub fn latest(&self, id: u32) -> Option<(i64, f64, bool)> {
        lock(&self.shards[id as usize % SHARDS])
            .latest
            .get(&id)
            .copied()
    }

    /// Records the newest point found in storage, unless a write at or after its timestamp
    /// got there first, and marks the entry verified.
    pub fn offer_latest(&self, id: u32, ts: i64, value: f64) {
        let mut shard = lock(&self.shards[id as usize % SHARDS]);
        let latest = shard.latest.entry(id).or_insert((ts, value, true));
        if ts > latest.0 {
            *latest = (ts, value, true);
        }
        latest.2 = true;
    }

    /// Drops points older than `floor`, returning how many were dropped.
    pub fn drop_before(&self, floor: i64) -> usize {
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = lock(shard);
            for buf in shard.points.values_mut() {
                let before = buf.ts.len();
                *buf = filter_range(buf, floor, i64::MAX);
                dropped += before - buf.ts.len();
            }
            shard.points.retain(|_, buf| !buf.ts.is_empty());
            shard.latest.retain(|_, (ts, _, _)| *ts >= floor);
        }
        self.points.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }
}

impl Frozen {
    pub fn copy_range(&self, id: u32, from: i64, to: i64) -> SeriesBuf {
        self.shards[id as usize % SHARDS]
            .get(&id)
            .map(|buf| filter_range(buf, from, to))
            .unwrap_or_default()
    }
}

/// Copies the points with `from <= ts < to`, keeping their order.
pub fn filter_range(buf: &SeriesBuf, from: i64, to: i64) -> SeriesBuf {
    let mut out = SeriesBuf::default();
    for (&ts, &value) in buf.ts.iter().zip(&buf.values) {
        if ts >= from && ts < to {
            out.ts.push(ts);
            out.values.push(value);
        }
    }
    out
}
