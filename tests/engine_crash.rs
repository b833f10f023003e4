//! Crash safety: a child process writes under sustained load and prints each durable
//! watermark; the parent kills it with SIGKILL, reopens the store, and checks that every
//! point acknowledged before the last printed watermark is present.
//!
//! The child is this test binary run again with `CRASH_CHILD_DIR` set, so the test needs
//! no helper binary.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stonelion::model::{Timestamp, Value};
use stonelion::storage::engine::{Engine, EngineOptions};
use stonelion::storage::{Point, Query, Selector, SeriesKey, TimeSeriesStore};

const CHILD_ENV: &str = "CRASH_CHILD_DIR";
const FIRST_BATCH_ENV: &str = "CRASH_CHILD_FIRST_BATCH";
const POINTS_PER_BATCH: u64 = 500;
const SERIES: u64 = 20;

fn options() -> EngineOptions {
    // Small limits, so checkpoints and compactions run while the child is killed.
    EngineOptions {
        commit_interval: Duration::from_millis(20),
        wal_max_bytes: 256 << 10,
        memory_budget_bytes: 24 * 40_000,
        compaction_min_segments: 3,
        ..EngineOptions::default()
    }
}

fn series(n: u64) -> SeriesKey {
    SeriesKey::new(
        "crash",
        vec![("device".to_owned(), format!("d{}", n % SERIES))],
        "v",
    )
}

/// Point number `n` has one series, timestamp and value, so the parent can check each.
fn point(n: u64) -> Point {
    Point {
        series: series(n),
        ts: Timestamp(i64::try_from(n).expect("small") * 1_000),
        value: Value::Number(n as f64 * 0.5),
    }
}

/// The child: writes batches until killed, printing `committed B` once batch B and every
/// batch before it are synced. Bounded to 60 s in case the parent dies first.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let first: u64 = std::env::var(FIRST_BATCH_ENV).unwrap().parse().unwrap();
    let engine = Engine::open(&dir, options()).unwrap();
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut last_printed = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut batch = first;
    while Instant::now() < deadline {
        let points = (0..POINTS_PER_BATCH)
            .map(|k| point(batch * POINTS_PER_BATCH + k))
            .collect();
        let seq = engine.write_with_seq(points).unwrap();
        pending.push((seq, batch));
        let durable = engine.durable_seq();
        let committed = pending
            .iter()
            .take_while(|(seq, _)| *seq <= durable)
            .last()
            .map(|(_, b)| *b);
        pending.retain(|(seq, _)| *seq > durable);
        if let Some(batch) = committed
            && committed != last_printed
        {
            println!("committed {batch}");
            last_printed = committed;
        }
        batch += 1;
    }
}

/// Runs the child on `dir`, kills it once it has committed `batches` batches past
/// `first`, and returns the last committed batch it printed.
fn run_and_kill(dir: &std::path::Path, first: u64, batches: u64) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env(FIRST_BATCH_ENV, first.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(batch) = line
                .strip_prefix("committed ")
                .and_then(|b| b.trim().parse::<u64>().ok())
            {
                let _ = tx.send(batch);
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut committed = None;
    while committed.is_none_or(|c| c < first + batches) {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("child committed too little within 60 s");
        match rx.recv_timeout(left) {
            Ok(batch) => committed = Some(batch),
            Err(e) => panic!("child stopped reporting commits: {e}"),
        }
    }
    // SIGKILL: no destructor runs, so nothing is synced after the last watermark.
    child.kill().unwrap();
    child.wait().unwrap();
    // Watermarks printed before the kill landed are still valid promises.
    while let Ok(batch) = rx.try_recv() {
        committed = Some(batch);
    }
    committed.unwrap()
}

/// Checks that points 0 up to the end of `committed` are all present with their values.
fn verify(dir: &std::path::Path, committed: u64) {
    let engine = Engine::open(dir, options()).expect("store opens after SIGKILL");
    assert!(
        engine.segment_bytes() > 0,
        "no checkpoint ran before the kill, so segments were not tested"
    );
    let query = Query {
        selector: Selector {
            measurement: Some("crash".to_owned()),
            ..Selector::default()
        },
        from: Timestamp(i64::MIN),
        to: Timestamp(i64::MAX),
        aggregation: None,
        limit: None,
    };
    let mut stored: HashMap<i64, f64> = HashMap::new();
    for series in engine.query(&query).unwrap() {
        for (ts, value) in series.points {
            stored.insert(ts.0, value.as_f64());
        }
    }
    let expected = (committed + 1) * POINTS_PER_BATCH;
    let missing: Vec<u64> = (0..expected)
        .filter(|n| !stored.contains_key(&(i64::try_from(*n).expect("small") * 1_000)))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {expected} committed points are missing, first {:?}",
        missing.len(),
        missing.first()
    );
    for n in 0..expected {
        assert_eq!(
            stored[&(i64::try_from(n).expect("small") * 1_000)],
            n as f64 * 0.5,
            "point {n} has the wrong value"
        );
    }
}

#[test]
fn sigkill_keeps_committed_points() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    let committed = run_and_kill(dir.path(), 0, 400);
    verify(dir.path(), committed);

    // A second crash, after recovering from the first, must keep both runs' points.
    let committed = run_and_kill(dir.path(), committed + 1, 400);
    verify(dir.path(), committed);
}
