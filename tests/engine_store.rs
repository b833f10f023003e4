//! Behaviour of the embedded engine through the `TimeSeriesStore` trait.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use stonelion::model::{Timestamp, Value, ValueKind};
use stonelion::storage::engine::{Engine, EngineOptions};
use stonelion::storage::{
    Aggregate, Point, Query, Selector, SeriesKey, StorageError, TimeSeriesStore,
};

const DAY_MS: i64 = 86_400_000;

fn key(profile: &str, site: &str, device: &str, field: &str) -> SeriesKey {
    SeriesKey::new(
        profile,
        vec![
            ("site".to_owned(), site.to_owned()),
            ("device".to_owned(), device.to_owned()),
            ("site_kind".to_owned(), "plant".to_owned()),
        ],
        field,
    )
}

fn gas(device: &str) -> SeriesKey {
    key("gas-detector", "s1", device, "gas_lel")
}

fn point(series: &SeriesKey, ts: i64, value: f64) -> Point {
    Point {
        series: series.clone(),
        ts: Timestamp(ts),
        value: Value::Number(value),
    }
}

fn open(dir: &std::path::Path) -> Engine {
    Engine::open(dir, EngineOptions::default()).expect("engine opens")
}

fn raw(series: &SeriesKey, from: i64, to: i64) -> Query {
    Query {
        selector: Selector {
            measurement: Some(series.measurement.clone()),
            tags: series.tags.clone(),
            field: Some(series.field.clone()),
        },
        from: Timestamp(from),
        to: Timestamp(to),
        aggregation: None,
        limit: None,
    }
}

fn numbers(engine: &Engine, query: &Query) -> Vec<(i64, f64)> {
    let result = engine.query(query).expect("query runs");
    assert!(
        result.len() <= 1,
        "expected at most one series, got {}",
        result.len()
    );
    result
        .into_iter()
        .flat_map(|s| s.points)
        .map(|(ts, v)| (ts.0, v.as_f64()))
        .collect()
}

#[test]
fn raw_query_returns_points_in_range() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let s = gas("d1");
    engine
        .write(
            (0..100)
                .map(|i| point(&s, 1_000 + i * 1_000, i as f64))
                .collect(),
        )
        .unwrap();

    let got = numbers(&engine, &raw(&s, 5_000, 10_000));
    assert_eq!(
        got,
        vec![
            (5_000, 4.0),
            (6_000, 5.0),
            (7_000, 6.0),
            (8_000, 7.0),
            (9_000, 8.0)
        ]
    );

    let mut limited = raw(&s, 0, i64::MAX);
    limited.limit = Some(3);
    assert_eq!(numbers(&engine, &limited).len(), 3);
}

#[test]
fn out_of_order_and_duplicates_keep_last_write() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let s = gas("d1");
    engine
        .write(vec![
            point(&s, 3_000, 3.0),
            point(&s, 1_000, 1.0),
            point(&s, 2_000, 2.0),
        ])
        .unwrap();
    engine.write(vec![point(&s, 2_000, 20.0)]).unwrap();
    engine
        .write(vec![point(&s, 1_000, 10.0), point(&s, 1_000, 11.0)])
        .unwrap();

    let expected = vec![(1_000, 11.0), (2_000, 20.0), (3_000, 3.0)];
    assert_eq!(numbers(&engine, &raw(&s, 0, 10_000)), expected);

    // A rewrite after the first values were sealed still wins.
    engine.checkpoint().unwrap();
    engine.write(vec![point(&s, 3_000, 30.0)]).unwrap();
    assert_eq!(
        numbers(&engine, &raw(&s, 0, 10_000)),
        vec![(1_000, 11.0), (2_000, 20.0), (3_000, 30.0)]
    );
    engine.compact_all().unwrap();
    assert_eq!(
        numbers(&engine, &raw(&s, 0, 10_000)),
        vec![(1_000, 11.0), (2_000, 20.0), (3_000, 30.0)]
    );
}

#[test]
fn aggregates_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let s = gas("d1");
    // Steps of 10 s: [0, 10 s) holds 1, 2, 3 and [10 s, 20 s) holds 10, 20.
    let values = [
        (0, 1.0),
        (4_000, 2.0),
        (9_999, 3.0),
        (10_000, 10.0),
        (15_000, 20.0),
    ];
    engine
        .write(values.iter().map(|&(ts, v)| point(&s, ts, v)).collect())
        .unwrap();

    let cases = [
        (Aggregate::Mean, [2.0, 15.0]),
        (Aggregate::Min, [1.0, 10.0]),
        (Aggregate::Max, [3.0, 20.0]),
        (Aggregate::First, [1.0, 10.0]),
        (Aggregate::Last, [3.0, 20.0]),
        (Aggregate::Sum, [6.0, 30.0]),
        (Aggregate::Count, [3.0, 2.0]),
    ];
    for (aggregate, expected) in cases {
        let mut query = raw(&s, 0, 20_000);
        query.aggregation = Some((Duration::from_secs(10), aggregate));
        let got = numbers(&engine, &query);
        assert_eq!(
            got,
            vec![(0, expected[0]), (10_000, expected[1])],
            "aggregate {aggregate:?}"
        );
    }
}

#[test]
fn zero_step_is_invalid_query() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let mut query = raw(&gas("d1"), 0, 1_000);
    query.aggregation = Some((Duration::ZERO, Aggregate::Mean));
    assert!(matches!(
        engine.query(&query),
        Err(StorageError::InvalidQuery(_))
    ));
}

#[test]
fn selector_filters_by_measurement_and_tags() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let a = key("gas-detector", "s1", "d1", "gas_lel");
    let b = key("gas-detector", "s2", "d2", "gas_lel");
    let c = key("gas-detector", "s1", "d3", "battery");
    let d = key("smoke-detector", "s1", "d4", "gas_lel");
    engine
        .write(
            [&a, &b, &c, &d]
                .iter()
                .map(|k| point(k, 1_000, 1.0))
                .collect(),
        )
        .unwrap();

    let by_site = Selector {
        measurement: Some("gas-detector".to_owned()),
        tags: vec![("site".to_owned(), "s1".to_owned())],
        field: None,
    };
    let mut found = engine.series(&by_site).unwrap();
    found.sort();
    assert_eq!(found, vec![a.clone(), c.clone()]);

    let query = Query {
        selector: by_site,
        from: Timestamp(0),
        to: Timestamp(2_000),
        aggregation: Some((Duration::from_secs(60), Aggregate::Count)),
        limit: None,
    };
    let result = engine.query(&query).unwrap();
    let mut keys: Vec<_> = result.iter().map(|s| s.series.clone()).collect();
    keys.sort();
    assert_eq!(keys, vec![a, c]);

    let every_field = Selector {
        field: Some("gas_lel".to_owned()),
        ..Selector::default()
    };
    assert_eq!(engine.series(&every_field).unwrap().len(), 3);
}

#[test]
fn bool_series_rejects_number_value() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let smoke = key("smoke-detector", "s1", "d1", "smoke");
    engine
        .write(vec![Point {
            series: smoke.clone(),
            ts: Timestamp(1_000),
            value: Value::Bool(true),
        }])
        .unwrap();

    let mixed = vec![
        Point {
            series: smoke.clone(),
            ts: Timestamp(2_000),
            value: Value::Bool(false),
        },
        point(&smoke, 3_000, 1.0),
    ];
    let err = engine.write(mixed).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::KindMismatch {
                stored: ValueKind::Bool,
                offered: ValueKind::Number,
                ..
            }
        ),
        "unexpected error {err}"
    );

    // The rejected batch stored nothing, and the bool series reads back as bools.
    let result = engine.query(&raw(&smoke, 0, 10_000)).unwrap();
    assert_eq!(result.len(), 1);
    assert_eq!(result[0].kind, ValueKind::Bool);
    assert_eq!(
        result[0].points,
        vec![(Timestamp(1_000), Value::Bool(true))]
    );

    // A new series with both kinds in one batch is rejected too.
    let fresh = key("smoke-detector", "s1", "d2", "smoke");
    let err = engine
        .write(vec![
            Point {
                series: fresh.clone(),
                ts: Timestamp(1),
                value: Value::Bool(true),
            },
            point(&fresh, 2, 1.0),
        ])
        .unwrap_err();
    assert!(
        matches!(err, StorageError::KindMismatch { .. }),
        "unexpected error {err}"
    );
    assert!(
        engine
            .series(&Selector::default())
            .unwrap()
            .iter()
            .all(|k| *k != fresh)
    );
}

#[test]
fn bool_aggregates_keep_kind_where_meaningful() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let smoke = key("smoke-detector", "s1", "d1", "smoke");
    let values = [false, true, true, false];
    let points = values
        .iter()
        .enumerate()
        .map(|(i, &b)| Point {
            series: smoke.clone(),
            ts: Timestamp(i64::try_from(i).expect("small") * 1_000),
            value: Value::Bool(b),
        })
        .collect();
    engine.write(points).unwrap();

    let run = |aggregate| {
        let mut query = raw(&smoke, 0, 10_000);
        query.aggregation = Some((Duration::from_secs(60), aggregate));
        engine.query(&query).unwrap()[0].points[0].1
    };
    assert_eq!(run(Aggregate::Max), Value::Bool(true));
    assert_eq!(run(Aggregate::Last), Value::Bool(false));
    assert_eq!(run(Aggregate::Mean), Value::Number(0.5));
    assert_eq!(run(Aggregate::Count), Value::Number(4.0));
}

#[test]
fn reopen_after_drop_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let s = gas("d1");
    let smoke = key("smoke-detector", "s1", "d1", "smoke");
    {
        let engine = open(dir.path());
        engine
            .write(
                (0..1_000)
                    .map(|i| point(&s, i * 1_000, i as f64 / 10.0))
                    .collect(),
            )
            .unwrap();
        engine.checkpoint().unwrap();
        engine
            .write(
                (1_000..1_500)
                    .map(|i| point(&s, i * 1_000, i as f64 / 10.0))
                    .collect(),
            )
            .unwrap();
        engine
            .write(vec![Point {
                series: smoke.clone(),
                ts: Timestamp(5),
                value: Value::Bool(true),
            }])
            .unwrap();
        engine.flush().unwrap();
    }
    let engine = open(dir.path());
    let got = numbers(&engine, &raw(&s, 0, i64::MAX));
    assert_eq!(got.len(), 1_500);
    assert!(got.iter().enumerate().all(|(i, &(ts, v))| {
        ts == i64::try_from(i).expect("small") * 1_000 && v == i as f64 / 10.0
    }));
    let smoke_data = engine.query(&raw(&smoke, 0, 10)).unwrap();
    assert_eq!(
        smoke_data[0].points,
        vec![(Timestamp(5), Value::Bool(true))]
    );

    // The kind survives the restart.
    let err = engine.write(vec![point(&smoke, 6, 1.0)]).unwrap_err();
    assert!(matches!(err, StorageError::KindMismatch { .. }));

    // A second reopen after a checkpoint reads everything from segments and SQLite.
    engine.checkpoint().unwrap();
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(numbers(&engine, &raw(&s, 0, i64::MAX)).len(), 1_500);
    assert_eq!(engine.series(&Selector::default()).unwrap().len(), 2);
}

#[test]
fn points_span_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let s = gas("d1");
    let points: Vec<Point> = (0..6)
        .map(|i| point(&s, i * DAY_MS / 2, i as f64))
        .collect();
    engine.write(points).unwrap();
    engine.checkpoint().unwrap();
    let got = numbers(&engine, &raw(&s, DAY_MS / 2, 2 * DAY_MS + 1));
    assert_eq!(
        got,
        vec![
            (DAY_MS / 2, 1.0),
            (DAY_MS, 2.0),
            (3 * DAY_MS / 2, 3.0),
            (2 * DAY_MS, 4.0)
        ]
    );
}

#[test]
fn retention_deletes_old_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let s = gas("d1");
    {
        let engine = open(dir.path());
        // One point per hour over four days, half sealed, half still in memory.
        engine
            .write(
                (0..48)
                    .map(|h| point(&s, h * 3_600_000, h as f64))
                    .collect(),
            )
            .unwrap();
        engine.checkpoint().unwrap();
        engine
            .write(
                (48..96)
                    .map(|h| point(&s, h * 3_600_000, h as f64))
                    .collect(),
            )
            .unwrap();

        // Cutoff inside day 2: days 0 and 1 end before it, day 2 is kept whole.
        let deleted = engine
            .enforce_retention(Timestamp(2 * DAY_MS + 5 * 3_600_000))
            .unwrap();
        assert_eq!(deleted, 48);
        let got = numbers(&engine, &raw(&s, 0, i64::MAX));
        assert_eq!(got.len(), 48);
        assert_eq!(got[0].0, 2 * DAY_MS);

        // Points older than the floor are dropped on write.
        engine.write(vec![point(&s, 1_000, 1.0)]).unwrap();
        assert_eq!(numbers(&engine, &raw(&s, 0, DAY_MS)), vec![]);
    }
    // Neither the WAL nor deleted partitions bring old points back.
    let engine = open(dir.path());
    let got = numbers(&engine, &raw(&s, 0, i64::MAX));
    assert_eq!(got.len(), 48);
    assert_eq!(got[0].0, 2 * DAY_MS);
}

#[test]
fn latest_returns_newest_point_per_series() {
    let dir = tempfile::tempdir().unwrap();
    let a = gas("d1");
    let b = gas("d2");
    {
        let engine = open(dir.path());
        engine
            .write(vec![
                point(&a, 5_000, 5.0),
                point(&a, 9_000, 9.0),
                point(&b, 7_000, 7.0),
            ])
            .unwrap();
        engine.checkpoint().unwrap();
    }
    let engine = open(dir.path());
    // An out-of-order write after the restart must not hide the newer sealed point.
    engine.write(vec![point(&a, 1_000, 1.0)]).unwrap();
    let mut latest = engine.latest(&Selector::default()).unwrap();
    latest.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        latest,
        vec![
            (a.clone(), Timestamp(9_000), Value::Number(9.0)),
            (b, Timestamp(7_000), Value::Number(7.0))
        ]
    );

    engine.write(vec![point(&a, 9_000, 90.0)]).unwrap();
    let latest = engine
        .latest(&Selector {
            tags: vec![("device".into(), "d1".into())],
            ..Selector::default()
        })
        .unwrap();
    assert_eq!(latest, vec![(a, Timestamp(9_000), Value::Number(90.0))]);
}

#[test]
fn compaction_merges_segments_and_keeps_points() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let series: Vec<SeriesKey> = (0..20).map(|d| gas(&format!("d{d}"))).collect();
    for round in 0..5 {
        let points = series
            .iter()
            .flat_map(|s| {
                (0..100).map(move |i| {
                    point(s, (round * 100 + i) * 1_000, ((round * 100 + i) % 7) as f64)
                })
            })
            .collect();
        engine.write(points).unwrap();
        engine.checkpoint().unwrap();
    }
    let before = engine.segment_bytes();
    engine.compact_all().unwrap();
    assert!(
        engine.segment_bytes() < before,
        "compaction grew {before} to {}",
        engine.segment_bytes()
    );
    for s in &series {
        let got = numbers(&engine, &raw(s, 0, i64::MAX));
        assert_eq!(got.len(), 500);
        assert!(got.iter().all(|&(ts, v)| v == ((ts / 1_000) % 7) as f64));
    }
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(numbers(&engine, &raw(&series[3], 0, i64::MAX)).len(), 500);
}

#[test]
fn memory_budget_applies_backpressure_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        memory_budget_bytes: 24 * 2_000,
        ..EngineOptions::default()
    };
    let engine = Engine::open(dir.path(), options).unwrap();
    let s = gas("d1");
    for batch in 0..20 {
        engine
            .write((0..500).map(|i| point(&s, batch * 500 + i, 1.0)).collect())
            .unwrap();
    }
    assert!(
        engine.metrics().backpressure_waits.get() > 0,
        "the budget never filled"
    );
    assert_eq!(numbers(&engine, &raw(&s, 0, i64::MAX)).len(), 10_000);
}

#[test]
fn write_declares_many_new_series_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    // Each new series appears twice in the batch, far apart, so the second point must
    // reuse the id declared for the first.
    let series: Vec<SeriesKey> = (0..3_000).map(|i| gas(&format!("d{i}"))).collect();
    let mut batch: Vec<Point> = series.iter().map(|s| point(s, 1_000, 1.0)).collect();
    batch.extend(series.iter().map(|s| point(s, 2_000, 2.0)));
    engine.write(batch).unwrap();

    let stored = engine.series(&Selector::default()).unwrap();
    assert_eq!(stored.len(), 3_000);
    for s in [&series[0], &series[1_499], &series[2_999]] {
        assert_eq!(
            numbers(&engine, &raw(s, 0, 10_000)),
            vec![(1_000, 1.0), (2_000, 2.0)],
            "{s:?}"
        );
    }

    // The ids survive a reopen, which replays the series declarations from the WAL.
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(engine.series(&Selector::default()).unwrap().len(), 3_000);
    assert_eq!(
        numbers(&engine, &raw(&series[2_999], 0, 10_000)),
        vec![(1_000, 1.0), (2_000, 2.0)]
    );
}

#[test]
fn new_series_kind_conflict_late_in_batch() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let mut batch: Vec<Point> = (0..1_000)
        .map(|i| point(&gas(&format!("d{i}")), 1_000, 1.0))
        .collect();
    batch.push(Point {
        series: gas("d500"),
        ts: Timestamp(2_000),
        value: Value::Bool(true),
    });
    let err = engine.write(batch).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::KindMismatch {
                stored: ValueKind::Number,
                offered: ValueKind::Bool,
                ..
            }
        ),
        "unexpected error {err}"
    );
    assert!(engine.series(&Selector::default()).unwrap().is_empty());
}

fn series_columns(dir: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(dir.join("index.sqlite")).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info('series')")
        .unwrap();
    stmt.query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn series_index_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let gas = gas("d1");
    let odd = key("gas-detector", "s 1,=\"é\"", "d2", "gas lel");
    let smoke = key("smoke-detector", "s1", "d3", "smoke");
    {
        let engine = open(dir.path());
        engine.write(vec![point(&gas, 1_000, 1.5)]).unwrap();
        engine.write(vec![point(&odd, 1_000, 2.5)]).unwrap();
        engine.checkpoint().unwrap();
        engine
            .write(vec![Point {
                series: smoke.clone(),
                ts: Timestamp(1_000),
                value: Value::Bool(true),
            }])
            .unwrap();
        engine.checkpoint().unwrap();
    }
    assert_eq!(series_columns(dir.path()), ["first_id", "count", "keys"]);

    let engine = open(dir.path());
    let mut stored = engine.series(&Selector::default()).unwrap();
    stored.sort_by(|a, b| a.measurement.cmp(&b.measurement).then(a.tags.cmp(&b.tags)));
    assert_eq!(stored, vec![gas, odd.clone(), smoke.clone()]);
    assert_eq!(numbers(&engine, &raw(&odd, 0, 10_000)), vec![(1_000, 2.5)]);
    let err = engine.write(vec![point(&smoke, 2_000, 1.0)]).unwrap_err();
    assert!(
        matches!(err, StorageError::KindMismatch { .. }),
        "bool kind lost across reopen: {err}"
    );
}

#[test]
fn series_index_format_1_is_converted() {
    let dir = tempfile::tempdir().unwrap();
    let gas = gas("d1");
    let smoke = key("smoke-detector", "s1", "d3", "smoke");
    {
        let conn = rusqlite::Connection::open(dir.path().join("index.sqlite")).unwrap();
        conn.execute_batch(
            "CREATE TABLE series (
                 id INTEGER PRIMARY KEY,
                 measurement TEXT NOT NULL,
                 tags TEXT NOT NULL,
                 field TEXT NOT NULL,
                 kind TEXT NOT NULL
             );
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )
        .unwrap();
        for (id, key, kind) in [(0, &gas, "number"), (1, &smoke, "bool")] {
            conn.execute(
                "INSERT INTO series (id, measurement, tags, field, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    id,
                    key.measurement,
                    serde_json::to_string(&key.tags).unwrap(),
                    key.field,
                    kind
                ],
            )
            .unwrap();
        }
    }

    {
        let engine = open(dir.path());
        let stored = engine.series(&Selector::default()).unwrap();
        assert_eq!(stored.len(), 2);
        assert!(stored.contains(&gas));
        assert!(stored.contains(&smoke));
    }
    assert_eq!(series_columns(dir.path()), ["first_id", "count", "keys"]);

    // The converted index keeps kinds and ids: a new series gets the next id and both
    // old series keep their kind after a second open.
    let engine = open(dir.path());
    let err = engine.write(vec![point(&smoke, 2_000, 1.0)]).unwrap_err();
    assert!(
        matches!(err, StorageError::KindMismatch { .. }),
        "bool kind lost in conversion: {err}"
    );
    let fresh = gas_detector_series("d9");
    engine.write(vec![point(&fresh, 1_000, 3.0)]).unwrap();
    engine.checkpoint().unwrap();
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(engine.series(&Selector::default()).unwrap().len(), 3);
    assert_eq!(
        numbers(&engine, &raw(&fresh, 0, 10_000)),
        vec![(1_000, 3.0)]
    );
}

fn gas_detector_series(device: &str) -> SeriesKey {
    key("gas-detector", "s2", device, "gas_lel")
}

fn limited(dir: &std::path::Path, max_series: usize) -> Engine {
    let options = EngineOptions {
        max_series,
        series_limit_exempt: vec!["alarm_state".to_owned()],
        ..EngineOptions::default()
    };
    Engine::open(dir, options).expect("engine opens")
}

#[test]
fn series_limit_keeps_existing_series() {
    let dir = tempfile::tempdir().unwrap();
    let engine = limited(dir.path(), 2);
    engine
        .write(vec![point(&gas("a"), 1, 1.0), point(&gas("b"), 1, 2.0)])
        .unwrap();
    let err = engine
        .write(vec![
            point(&gas("c"), 2, 3.0),
            point(&gas("a"), 2, 1.5),
            point(&gas("d"), 2, 4.0),
        ])
        .unwrap_err();
    match err {
        StorageError::SeriesLimit {
            limit,
            series,
            rejected,
            stored,
            first,
        } => {
            assert_eq!(limit, 2);
            assert_eq!(series, 2);
            assert_eq!(rejected, 2);
            assert_eq!(stored, 1);
            assert!(first.contains("device=c"), "{first}");
        }
        other => panic!("expected a series limit error, got {other}"),
    }
    assert_eq!(
        numbers(&engine, &raw(&gas("a"), 0, 10)),
        [(1, 1.0), (2, 1.5)]
    );
    assert!(numbers(&engine, &raw(&gas("c"), 0, 10)).is_empty());
    assert_eq!(engine.series(&Selector::default()).unwrap().len(), 2);
    assert_eq!(engine.metrics().series_limit_rejected.get(), 2);
}

#[test]
fn series_limit_exempts_configured_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let engine = limited(dir.path(), 1);
    let state = key("alarm_state", "s1", "a", "level");
    engine
        .write(vec![point(&state, 1, 1.0), point(&gas("a"), 1, 1.0)])
        .unwrap();
    // The exempt series does not take the one free slot, and is still created at the limit.
    let other_state = key("alarm_state", "s1", "b", "level");
    engine.write(vec![point(&other_state, 1, 2.0)]).unwrap();
    let err = engine.write(vec![point(&gas("b"), 1, 1.0)]).unwrap_err();
    assert!(
        matches!(err, StorageError::SeriesLimit { series: 1, .. }),
        "{err}"
    );
    assert_eq!(engine.series(&Selector::default()).unwrap().len(), 3);
}

#[test]
fn series_limit_zero_means_no_limit() {
    let dir = tempfile::tempdir().unwrap();
    let engine = limited(dir.path(), 0);
    let points: Vec<Point> = (0..100)
        .map(|i| point(&gas(&format!("d{i}")), 1, 1.0))
        .collect();
    engine.write(points).unwrap();
    assert_eq!(engine.series(&Selector::default()).unwrap().len(), 100);
}

#[test]
fn series_limit_counts_replayed_series() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = limited(dir.path(), 2);
        engine
            .write(vec![point(&gas("a"), 1, 1.0), point(&gas("b"), 1, 2.0)])
            .unwrap();
        // No checkpoint: the series are only in the WAL when the engine reopens.
    }
    let engine = limited(dir.path(), 2);
    let err = engine.write(vec![point(&gas("c"), 2, 3.0)]).unwrap_err();
    assert!(
        matches!(err, StorageError::SeriesLimit { series: 2, .. }),
        "{err}"
    );
    engine.write(vec![point(&gas("b"), 2, 2.5)]).unwrap();
    // A higher limit after a restart makes room again.
    drop(engine);
    let engine = limited(dir.path(), 3);
    engine.write(vec![point(&gas("c"), 2, 3.0)]).unwrap();
}

/// Prints the resident memory that 200,000 new series add to a process (Linux only).
/// Run with `cargo test --test engine_store series_memory -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, prints a figure"]
fn series_memory_per_series() {
    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }
    const SERIES: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let engine = limited(dir.path(), 0);
    engine.write(vec![point(&gas("warm-up"), 1, 1.0)]).unwrap();
    engine.checkpoint().unwrap();
    let before = rss_bytes();
    for batch in 0..SERIES / 5_000 {
        let points: Vec<Point> = (0..5_000)
            .map(|i| {
                let device = format!("device-{:07}", batch * 5_000 + i);
                point(
                    &key("telegraf_cpu", "site-a", &device, "usage_user"),
                    2,
                    1.0,
                )
            })
            .collect();
        engine.write(points).unwrap();
    }
    // Sealing the points leaves the series index and per-series state in memory.
    engine.checkpoint().unwrap();
    let after = rss_bytes();
    let per_series = (after.saturating_sub(before)) / SERIES as u64;
    println!(
        "{SERIES} series added {} bytes of RSS, {per_series} bytes per series",
        after - before
    );
    assert!(per_series > 0);
}
