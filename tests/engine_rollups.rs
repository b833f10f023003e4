//! Downsampling in the embedded engine: rollups equal the raw aggregates they replace,
//! survive raw retention, a reopen and a crash, and expire by their own retention.
//!
//! Retention runs with explicit cutoffs, so no test waits for the wall clock. The crash
//! test's child is this test binary run again with `ROLLUP_CHILD_DIR` set.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use stonelion::model::{Timestamp, Value};
use stonelion::storage::engine::{Engine, EngineOptions, RollupTier};
use stonelion::storage::{
    Aggregate, Point, Query, Selector, SeriesData, SeriesKey, TimeSeriesStore,
};

const SECOND_MS: i64 = 1_000;
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
/// A day boundary, so hour partitions and every step below start here.
const T0: i64 = 1_699_920_000_000;
/// Data covers six one-hour partitions.
const SPAN_MS: i64 = 6 * HOUR_MS;
/// Raw retention of the options below, which rollup cutoffs are derived from.
const RAW_RETENTION_MS: i64 = 2 * HOUR_MS;
/// A retention cutoff that deletes the raw partitions of the first four hours.
const EXPIRE_FOUR_HOURS: i64 = T0 + 4 * HOUR_MS;

const CHILD_ENV: &str = "ROLLUP_CHILD_DIR";
const CHILD_MODE_ENV: &str = "ROLLUP_CHILD_MODE";

/// Hour partitions, raw data for 2 h, 1-minute rollups for 1 day and 10-minute rollups
/// for 2 days.
fn options() -> EngineOptions {
    EngineOptions {
        partition_duration: Duration::from_millis(HOUR_MS as u64),
        retention: Duration::from_millis(RAW_RETENTION_MS as u64),
        rollups: vec![
            RollupTier {
                resolution: Duration::from_secs(60),
                retention: Duration::from_secs(86_400),
            },
            RollupTier {
                resolution: Duration::from_secs(600),
                retention: Duration::from_secs(2 * 86_400),
            },
        ],
        ..EngineOptions::default()
    }
}

fn key(n: usize) -> SeriesKey {
    let field = if n < 3 { "gas_lel" } else { "alarm" };
    SeriesKey::new(
        "gas-detector",
        vec![("device".to_owned(), format!("d{n}"))],
        field,
    )
}

/// Series 0 to 2 hold numbers, 3 and 4 bools. Numbers are multiples of 0.25, so every
/// sum is exact in f64 whatever order it adds in.
fn point(series: usize, ts: i64, raw: i32) -> Point {
    let value = if series < 3 {
        Value::Number(f64::from(raw) * 0.25)
    } else {
        Value::Bool(raw > 0)
    };
    Point {
        series: key(series),
        ts: Timestamp(ts),
        value,
    }
}

fn query(from: i64, to: i64, aggregation: Option<(i64, Aggregate)>) -> Query {
    Query {
        selector: Selector {
            measurement: Some("gas-detector".to_owned()),
            ..Selector::default()
        },
        from: Timestamp(from),
        to: Timestamp(to),
        aggregation: aggregation
            .map(|(step, aggregate)| (Duration::from_millis(step as u64), aggregate)),
        limit: None,
    }
}

fn run(
    engine: &Engine,
    from: i64,
    to: i64,
    aggregation: Option<(i64, Aggregate)>,
) -> Vec<SeriesData> {
    let mut result = engine.query(&query(from, to, aggregation)).unwrap();
    result.sort_by(|a, b| a.series.cmp(&b.series));
    result
}

/// Steps that are multiples of a tier's resolution, including 3 h, whose step from 3 h
/// to 6 h spans the raw retention floor at 4 h.
const ROLLUP_STEPS: [i64; 5] = [
    MINUTE_MS,
    3 * MINUTE_MS,
    10 * MINUTE_MS,
    HOUR_MS,
    3 * HOUR_MS,
];

/// Every aggregate over the whole span for each step in `steps`.
fn aggregates(
    engine: &Engine,
    from: i64,
    to: i64,
    steps: &[i64],
) -> Vec<((i64, Aggregate), Vec<SeriesData>)> {
    let mut out = Vec::new();
    for &step in steps {
        for aggregate in Aggregate::ALL {
            out.push((
                (step, aggregate),
                run(engine, from, to, Some((step, aggregate))),
            ));
        }
    }
    out
}

fn assert_same(
    before: &[((i64, Aggregate), Vec<SeriesData>)],
    engine: &Engine,
    from: i64,
    to: i64,
    when: &str,
) {
    for ((step, aggregate), expected) in before {
        let actual = run(engine, from, to, Some((*step, *aggregate)));
        assert_eq!(
            &actual, expected,
            "{when}: {aggregate:?} per {step} ms differs from the raw aggregate"
        );
    }
}

fn rollup_partition(dir: &Path, resolution_ms: i64, start: i64) -> std::path::PathBuf {
    dir.join("rollups")
        .join(format!("r-{resolution_ms}"))
        .join(format!("p-{start}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random numbers and bools in three write batches over six partitions: aggregates
    /// after raw retention deleted four partitions equal those before, also after a reopen.
    #[test]
    fn rollups_equal_raw_aggregates(
        points in prop::collection::vec((0..5usize, 0..SPAN_MS / SECOND_MS, -200..200i32, 0..3u8), 1..400),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), options()).unwrap();
        for batch in 0..3u8 {
            let writes: Vec<Point> = points
                .iter()
                .filter(|p| p.3 == batch)
                .map(|&(series, second, raw, _)| point(series, T0 + second * SECOND_MS, raw))
                .collect();
            engine.write(writes).unwrap();
            // The last batch stays in memory, so retention must seal it before rolling up.
            if batch < 2 {
                engine.checkpoint().unwrap();
            }
        }
        let before = aggregates(&engine, T0, T0 + SPAN_MS, &ROLLUP_STEPS);
        // From and to inside a minute: rollups cover whole buckets, so the expired part
        // starts at the next minute.
        let (odd_from, odd_to) = (T0 + 12_345, T0 + SPAN_MS - 5_000);
        let before_odd = aggregates(&engine, (odd_from / MINUTE_MS + 1) * MINUTE_MS, odd_to, &ROLLUP_STEPS);
        let raw_kept = run(&engine, EXPIRE_FOUR_HOURS, T0 + SPAN_MS, Some((90 * SECOND_MS, Aggregate::Sum)));

        engine.enforce_retention(Timestamp(EXPIRE_FOUR_HOURS)).unwrap();

        let raw_points = run(&engine, T0, EXPIRE_FOUR_HOURS, None);
        prop_assert!(raw_points.is_empty(), "raw points of expired partitions were returned: {raw_points:?}");
        assert_same(&before, &engine, T0, T0 + SPAN_MS, "after raw retention");
        assert_same(&before_odd, &engine, odd_from, odd_to, "unaligned range after raw retention");
        // 90 s is no multiple of 1 min, so the expired part has no data.
        let not_multiple = run(&engine, T0, T0 + SPAN_MS, Some((90 * SECOND_MS, Aggregate::Sum)));
        prop_assert_eq!(not_multiple, raw_kept);

        drop(engine);
        let engine = Engine::open(dir.path(), options()).unwrap();
        assert_same(&before, &engine, T0, T0 + SPAN_MS, "after reopen");
    }
}

#[test]
fn late_points_reach_rollups() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), options()).unwrap();
    engine
        .write((0..60).map(|i| point(0, T0 + i * MINUTE_MS, 4)).collect())
        .unwrap();
    engine.roll_up(Timestamp(i64::MAX)).unwrap();
    let first = rollup_partition(dir.path(), MINUTE_MS, T0);
    assert!(
        first.is_dir(),
        "roll_up wrote no rollup for the first partition"
    );

    // One late point is sealed and replaces the stale rollup, and one stays in memory
    // until retention seals it.
    engine
        .write(vec![point(0, T0 + 30 * SECOND_MS, 8)])
        .unwrap();
    engine.checkpoint().unwrap();
    engine.roll_up(Timestamp(i64::MAX)).unwrap();
    let files = std::fs::read_dir(&first).unwrap().count();
    assert_eq!(files, 1, "the replaced rollup was not deleted");
    engine
        .write(vec![point(0, T0 + 45 * SECOND_MS, 12)])
        .unwrap();
    engine.enforce_retention(Timestamp(T0 + HOUR_MS)).unwrap();

    let count = run(&engine, T0, T0 + HOUR_MS, Some((HOUR_MS, Aggregate::Count)));
    assert_eq!(count.len(), 1);
    assert_eq!(count[0].points, vec![(Timestamp(T0), Value::Number(62.0))]);
    let sum = run(&engine, T0, T0 + HOUR_MS, Some((HOUR_MS, Aggregate::Sum)));
    assert_eq!(
        sum[0].points,
        vec![(Timestamp(T0), Value::Number(60.0 + 2.0 + 3.0))]
    );
    let max = run(
        &engine,
        T0,
        T0 + MINUTE_MS,
        Some((MINUTE_MS, Aggregate::Max)),
    );
    assert_eq!(max[0].points, vec![(Timestamp(T0), Value::Number(3.0))]);
}

#[test]
fn rollup_retention_deletes_old_rollups() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), options()).unwrap();
    let points: Vec<Point> = (0..SPAN_MS / MINUTE_MS)
        .map(|i| point(i as usize % 5, T0 + i * MINUTE_MS, (i % 7) as i32))
        .collect();
    engine.write(points).unwrap();
    let before = aggregates(&engine, T0, T0 + SPAN_MS, &[10 * MINUTE_MS, HOUR_MS]);
    engine
        .enforce_retention(Timestamp(EXPIRE_FOUR_HOURS))
        .unwrap();
    engine.roll_up(Timestamp(i64::MAX)).unwrap();
    let bytes_before = engine.rollup_bytes();

    // The 1-minute tier keeps 22 h more than raw data, so this cutoff deletes its first
    // two partitions. The 10-minute tier keeps 46 h more and loses nothing.
    let cutoff = T0 + 2 * HOUR_MS + 22 * HOUR_MS;
    engine.enforce_retention(Timestamp(cutoff)).unwrap();

    for start in [T0, T0 + HOUR_MS] {
        assert!(
            !rollup_partition(dir.path(), MINUTE_MS, start).exists(),
            "1-minute rollup p-{start} was kept"
        );
        assert!(
            rollup_partition(dir.path(), 10 * MINUTE_MS, start).is_dir(),
            "10-minute rollup p-{start} was deleted"
        );
    }
    for hour in 2..6 {
        let start = T0 + hour * HOUR_MS;
        assert!(
            rollup_partition(dir.path(), MINUTE_MS, start).is_dir(),
            "1-minute rollup p-{start} was deleted"
        );
    }
    assert!(
        engine.rollup_bytes() < bytes_before,
        "rollup bytes did not shrink"
    );

    let per_minute = run(
        &engine,
        T0,
        T0 + 2 * HOUR_MS,
        Some((MINUTE_MS, Aggregate::Count)),
    );
    assert!(
        per_minute.is_empty(),
        "1-minute steps were answered from deleted rollups: {per_minute:?}"
    );
    // 10-minute steps read the 10-minute tier for the first two hours.
    assert_same(&before, &engine, T0, T0 + SPAN_MS, "after rollup retention");

    drop(engine);
    let engine = Engine::open(dir.path(), options()).unwrap();
    assert_same(&before, &engine, T0, T0 + SPAN_MS, "after reopen");
    let per_minute = run(
        &engine,
        T0,
        T0 + 2 * HOUR_MS,
        Some((MINUTE_MS, Aggregate::Count)),
    );
    assert!(
        per_minute.is_empty(),
        "deleted rollups came back after a reopen"
    );
}

const CRASH_SERIES: usize = 20;
const CRASH_INTERVAL_MS: i64 = 10 * SECOND_MS;

fn crash_key(series: usize) -> SeriesKey {
    SeriesKey::new(
        "crash",
        vec![("device".to_owned(), format!("d{series}"))],
        "v",
    )
}

/// Point `i` of a series: one value per 10 s over the six partitions.
fn crash_point(series: usize, i: i64) -> Point {
    let series_number = i64::try_from(series).unwrap();
    let value = ((i * 7 + series_number * 13) % 41 - 20) as f64 * 0.5;
    Point {
        series: crash_key(series),
        ts: Timestamp(T0 + i * CRASH_INTERVAL_MS),
        value: Value::Number(value),
    }
}

fn crash_query(step: i64, aggregate: Aggregate) -> Query {
    Query {
        selector: Selector {
            measurement: Some("crash".to_owned()),
            ..Selector::default()
        },
        ..query(T0, T0 + SPAN_MS, Some((step, aggregate)))
    }
}

/// The child, in one of two modes until killed (bounded to 60 s in case the parent dies
/// first):
/// - `expire`: expires the first three partitions one by one, so each retention run
///   rolls up a partition for the first time before it deletes it.
/// - `rewrite`: rewrites stored points with their own values, which leaves every
///   aggregate as it is but makes a partition's rollup stale, and rolls up again. Every
///   10 rounds it expires one more partition. A child that starts after an earlier one
///   was killed resumes at the persisted retention floor.
#[test]
fn rollup_crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mode = std::env::var(CHILD_MODE_ENV).unwrap();
    let engine = Engine::open(&dir, options()).unwrap();
    println!("opened");
    if mode == "expire" {
        for hour in 1..=3 {
            engine
                .enforce_retention(Timestamp(T0 + hour * HOUR_MS))
                .unwrap();
            println!("expired {hour}");
        }
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let per_partition = HOUR_MS / CRASH_INTERVAL_MS;
    let mut round: i64 = 0;
    while Instant::now() < deadline {
        let i = (round % 6) * per_partition + round % per_partition;
        let series = usize::try_from(round).unwrap() % CRASH_SERIES;
        engine.write(vec![crash_point(series, i)]).unwrap();
        engine.roll_up(Timestamp(i64::MAX)).unwrap();
        if round % 10 == 9 {
            let hour = (round / 10 + 1).min(6);
            engine
                .enforce_retention(Timestamp(T0 + hour * HOUR_MS))
                .unwrap();
            println!("expired {hour}");
        }
        round += 1;
    }
}

/// Runs the child in `mode` on `dir` and kills it with SIGKILL `delay` after it opened
/// the store. Returns the lines it printed.
fn run_and_kill(dir: &Path, mode: &str, delay: Duration) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "rollup_crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .env(CHILD_MODE_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The test harness prints its own lines first, and `test NAME ... ` before `opened`.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines: Vec<String> = Vec::new();
    while !lines.iter().any(|l| l.ends_with("opened")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(e) => panic!("child did not open the store within 60 s ({e}); output: {lines:?}"),
        }
    }
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    lines.extend(rx.try_iter());
    lines
}

#[test]
fn sigkill_during_rollup_keeps_rollups_exact() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let steps = [10 * MINUTE_MS, HOUR_MS];
    let before = {
        let engine = Engine::open(dir.path(), options()).unwrap();
        let points: Vec<Point> = (0..CRASH_SERIES)
            .flat_map(|series| {
                (0..SPAN_MS / CRASH_INTERVAL_MS).map(move |i| crash_point(series, i))
            })
            .collect();
        engine.write(points).unwrap();
        engine.checkpoint().unwrap();
        let mut before = Vec::new();
        for step in steps {
            for aggregate in Aggregate::ALL {
                before.push((
                    (step, aggregate),
                    engine.query(&crash_query(step, aggregate)).unwrap(),
                ));
            }
        }
        before
    };

    // Kill points spread over the child's work; the delay is how long the child runs.
    let mut expired = Vec::new();
    let runs = [
        ("expire", 5),
        ("expire", 15),
        ("expire", 30),
        ("rewrite", 20),
        ("rewrite", 60),
        ("rewrite", 120),
        ("rewrite", 250),
    ];
    for (mode, delay_ms) in runs {
        let lines = run_and_kill(dir.path(), mode, Duration::from_millis(delay_ms));
        expired.extend(lines.into_iter().filter(|l| l.starts_with("expired")));
        expired.dedup();
    }

    let engine = Engine::open(dir.path(), options()).expect("store opens after SIGKILL");
    for tier in ["r-60000", "r-600000"] {
        for partition in std::fs::read_dir(dir.path().join("rollups").join(tier)).unwrap() {
            let files: Vec<String> = std::fs::read_dir(partition.unwrap().path())
                .unwrap()
                .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                files.len(),
                1,
                "a rollup partition holds {files:?} after reopening"
            );
        }
    }
    engine.enforce_retention(Timestamp(T0 + SPAN_MS)).unwrap();
    assert_eq!(
        engine.segment_bytes(),
        0,
        "raw partitions are left after expiring them all"
    );
    for ((step, aggregate), expected) in &before {
        let actual = engine.query(&crash_query(*step, *aggregate)).unwrap();
        assert_eq!(
            &actual, expected,
            "{aggregate:?} per {step} ms differs after the crashes (children printed {expired:?})"
        );
    }
}
